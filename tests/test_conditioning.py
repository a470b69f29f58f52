"""benchmarks/conditioning.py end to end: a real checkpoint evaluated at several targets in one batched rollout."""
import csv
import os
import subprocess
import sys

import pytest

import dt
from conftest import ROOT


def test_conditioning_curve_of_a_real_checkpoint(tmp_path, hopper_file, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    dt.train(dt.TrainConfig(env_name="hopper-medium-v2", dataset_dir=str(hopper_file.parent), update_steps=4,
                            eval_every=4, batch_size=4, seq_len=5, episode_len=100, embedding_dim=16, num_layers=1,
                            eval_episodes=1, target_returns=(100.0,), runs_dir=str(tmp_path / "runs"), device="cpu",
                            eval_workers=0))
    (run,) = (tmp_path / "runs").iterdir()
    env = {**os.environ, "D4RL_DATASET_DIR": str(hopper_file.parent)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/conditioning.py"), str(run), "--out",
                             str(tmp_path / "out"), "--targets", "3", "--episodes", "2", "--eval_workers", "0",
                             "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "out" / "conditioning.csv").open()))
    assert len(rows) == 3 and all(int(row["episodes"]) == 2 for row in rows)
    assert sorted(float(row["target"]) for row in rows) == [float(row["target"]) for row in rows]  # lowest first
    assert (tmp_path / "out" / "conditioning.png").stat().st_size > 0
