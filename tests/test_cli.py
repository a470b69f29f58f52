"""End to end: `python algorithms/dt.py ...` as a user runs it, on a D4RL-layout file of real Hopper data."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyrallis
import pytest
import torch

import dt
from conftest import ROOT, write_d4rl_file

TINY = ["--update_steps", "40", "--eval_every", "20", "--log_every", "10", "--batch_size", "16",
        "--eval_episodes", "2", "--target_returns", "[3600,1800]", "--seq_len", "10", "--embedding_dim", "32",
        "--num_layers", "2", "--warmup_steps", "10", "--device", "auto"]


@pytest.fixture()
def user_env(hopper_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="disabled", D4RL_DATASET_DIR=str(hopper_file.parent), HOME=str(tmp_path / "home"),
               http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")  # no network, whatever the machine
    return env


def run_dt(args, env, cwd):
    return subprocess.run([sys.executable, str(ROOT / "algorithms/dt.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def read_rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_and_evaluate_end_to_end(user_env, tmp_path):
    result = run_dt(["--env_name", "hopper-medium-v2", *TINY, "--runs_dir", "runs", "--checkpoints_path", "ckpt"],
                    user_env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("DT-hopper-medium-v2-seed10-")
    rows = read_rows(run_dir)
    train_rows = [r for r in rows if "train_loss" in r]
    eval_rows = [r for r in rows if "train_loss" not in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
    assert [r["step"] for r in eval_rows] == [20, 40]
    eval_keys = {f"eval/{t}_{k}" for t in ("3600.0", "1800.0")
                 for k in ("return_mean", "return_std", "normalized_score_mean", "normalized_score_std",
                           "episode_length_mean", "terminated_fraction")}
    assert all(set(r) == {"step", "train_loss", "learning_rate", "grad_norm"} for r in train_rows)
    assert all(0 < r["grad_norm"] < 1e3 for r in train_rows)  # before clipping: above clip_grad is allowed
    assert all(set(r) == {"step"} | eval_keys for r in eval_rows)
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert train_rows[0]["learning_rate"] == pytest.approx(10 / 10 * 1e-4)  # warm-up reached at update 10
    assert "eval @ step 40" in result.stdout and "3600.0" in result.stdout

    config = pyrallis.load(dt.TrainConfig, open(run_dir / "config.yaml"))
    assert config.update_steps == 40 and config.target_returns == (3600.0, 1800.0) and config.embedding_dim == 32

    assert config.run_dir == str(run_dir.relative_to(tmp_path))  # `--run_dir <folder>` finds the run again
    # the step-20 latest.pt became latest.prev.pt when the step-40 one was written
    assert {p.name for p in (tmp_path / "ckpt" / run_dir.name).iterdir()} == {"latest.pt", "latest.prev.pt", "best.pt"}
    assert torch.load(tmp_path / "ckpt" / run_dir.name / "latest.prev.pt", weights_only=False)["step"] == 20
    checkpoint = torch.load(tmp_path / "ckpt" / run_dir.name / "latest.pt", weights_only=False)
    assert checkpoint["step"] == 40 and checkpoint["config"]["env_name"] == "hopper-medium-v2"
    assert checkpoint["state_mean"].shape == (11,) and checkpoint["state_std"].shape == (11,)
    model = dt.DecisionTransformer(11, 3, seq_len=10, embedding_dim=32, num_layers=2)
    model.load_state_dict(checkpoint["model_state"])
    best = torch.load(tmp_path / "ckpt" / run_dir.name / "best.pt", weights_only=False)
    top = "eval/3600.0_normalized_score_mean"  # best is judged at the highest target
    assert best["best_score"] == max(r[top] for r in eval_rows) and best["step"] in (20, 40)
    assert best["metrics"][top] == best["best_score"]


def test_own_file_and_offline_wandb_without_account(user_env, tmp_path):
    own = tmp_path / "my_walker.hdf5"
    write_d4rl_file(own, "Walker2d-v4", episodes=4, max_steps=40, seed=3)
    env = {k: v for k, v in user_env.items() if k != "WANDB_MODE"}  # no WANDB_MODE, no API key, empty HOME
    result = run_dt(["--env_name", "my-walker", "--dataset_path", str(own), "--eval_env", "Walker2d-v4",
                     *TINY, "--update_steps", "5", "--eval_every", "5", "--runs_dir", "runs"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging offline" in result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    (eval_row,) = [r for r in read_rows(run_dir) if "train_loss" not in r]
    # no reference scores given: raw returns only
    assert set(eval_row) == {"step"} | {f"eval/{t}_{k}" for t in ("3600.0", "1800.0") for k in
                                        ("return_mean", "return_std", "episode_length_mean", "terminated_fraction")}


def test_wandb_mode_is_read_at_every_run_not_once_per_process(tmp_path, monkeypatch):
    """wandb caches its environment at the first init: a disabled run must not silence a later offline one."""
    config = dt.TrainConfig(env_name="hopper-medium-v2")
    for mode in ("disabled", "offline"):
        monkeypatch.setenv("WANDB_MODE", mode)
        (tmp_path / mode).mkdir()
        logger = dt.RunLogger(config, mode, tmp_path / mode)
        logger.log({"x": 1.0}, step=1)
        logger.finish()
    assert not list((tmp_path / "disabled").glob("wandb/offline-run-*"))
    assert list((tmp_path / "offline").glob("wandb/offline-run-*/files"))


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_dataset_suggests_names(user_env, tmp_path):
    result = run_dt(["--env_name", "hopper-medium-replay-v3"], user_env, tmp_path)
    assert_one_line_error(result, "hopper-medium-replay-v3", "hopper-medium-replay-v2")


def test_missing_dataset_without_network(user_env, tmp_path):
    empty = tmp_path / "datasets"
    empty.mkdir()
    user_env["D4RL_DATASET_DIR"] = str(empty)
    result = run_dt(["--env_name", "walker2d-medium-replay-v2", "--device", "cpu"], user_env, tmp_path)
    assert_one_line_error(result, str(empty / "walker2d_medium_replay-v2.hdf5"),
                          "https://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/walker2d_medium_replay-v2.hdf5")
    assert list(empty.iterdir()) == []  # no partial download left


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(user_env, tmp_path):
    result = run_dt(["--env_name", "hopper-medium-v2", "--device", "cuda"], user_env, tmp_path)
    assert_one_line_error(result, "CUDA is not available", "--device auto")


def test_bad_field_value(user_env, tmp_path):
    result = run_dt(["--target_returns", "3600"], user_env, tmp_path)
    assert_one_line_error(result, "target_returns", "[3600,1800]")
