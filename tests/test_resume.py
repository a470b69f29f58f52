"""Runs survive crashes: checkpoints, exact resume after kill -9 and signals, eval-only, NaN stop.

Every run here is a real `algorithms/dt.py` subprocess; faults are injected by a small wrapper
script that patches one function of dt and then calls dt.main().
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

RUN = ["--env_name", "hopper-medium-v2", "--update_steps", "300", "--eval_every", "100", "--log_every", "10",
       "--batch_size", "8", "--eval_episodes", "2", "--target_returns", "[3600,1800]", "--seq_len", "5",
       "--embedding_dim", "16", "--num_layers", "1", "--warmup_steps", "50", "--learning_rate", "1e-3",
       "--eval_workers", "0", "--deterministic_torch", "true", "--device", "cpu"]

# Runs dt.main() with one fault injected; FAULT and MARKER come from the environment.
WRAPPER = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT / 'algorithms')!r})
import dt, torch
fault, marker = os.environ["FAULT"], os.environ["MARKER"]
if fault == "hang_in_checkpoint_write":  # the step-200 checkpoint write stops half way, until kill -9
    real_save, real_write, saving = torch.save, dt.atomic_write, []
    def save(obj, file):
        saving.append(obj.get("step") if isinstance(obj, dict) else None)
        real_save(obj, file)
    def atomic_write(path, write, keep_previous=False):
        if saving and saving[-1] == 200 and path.name == "latest.pt":
            path.with_name(f"latest.pt.tmp-{os.getpid()}").write_bytes(b"half a checkpoint")
            open(marker, "w").close()
            time.sleep(600)
        real_write(path, write, keep_previous)
    dt.torch.save, dt.atomic_write = save, atomic_write
elif fault == "nan_from_step_150":  # the loss turns NaN at update 150
    real_mse, calls = dt.masked_mse, [0]
    def mse(*args):
        calls[0] += 1
        loss = real_mse(*args)
        return loss * float("nan") if calls[0] >= 150 else loss
    dt.masked_mse = mse
elif fault == "slow_updates":  # ~20 ms per update, so a signal lands mid-training
    real_step = dt.optimizer_step
    def step(*args):
        time.sleep(0.02)
        if not os.path.exists(marker):
            open(marker, "w").close()
        return real_step(*args)
    dt.optimizer_step = step
dt.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def env(hopper_file, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", D4RL_DATASET_DIR=str(hopper_file.parent),
               HOME=str(tmp_path_factory.mktemp("home")), http_proxy="http://127.0.0.1:9")
    return env


def dt_command(args, fault=None, marker=None):
    if fault is None:
        return [sys.executable, str(ROOT / "algorithms/dt.py"), *args]
    return [sys.executable, "-c", WRAPPER, *args]


def run(args, env, cwd, fault=None, marker=None):
    full_env = {**env, "FAULT": fault or "", "MARKER": str(marker or "")}
    return subprocess.run(dt_command(args, fault), env=full_env, cwd=cwd, capture_output=True, text=True, timeout=300)


def start(args, env, cwd, fault, marker):
    full_env = {**env, "FAULT": fault, "MARKER": str(marker)}
    return subprocess.Popen(dt_command(args, fault), env=full_env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path):
    state_a = torch.load(a, weights_only=False)["model_state"]
    state_b = torch.load(b, weights_only=False)["model_state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("full")
    result = run([*RUN, "--run_dir", "full"], env, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "full"


def test_checkpoint_holds_everything_to_resume(uninterrupted):
    checkpoint = torch.load(uninterrupted / "latest.pt", weights_only=False)
    assert checkpoint["step"] == 300
    for key in ("model_state", "optimizer_state", "scheduler_state", "state_mean", "state_std", "config",
                "wandb_run_id", "best_score"):
        assert key in checkpoint
    assert set(checkpoint["rng"]) == {"python", "numpy", "torch", "cuda", "sampler"}
    assert checkpoint["wandb_run_id"] == (uninterrupted / "wandb_run_id").read_text()
    assert checkpoint["scheduler_state"]["last_epoch"] == 300
    assert len(checkpoint["optimizer_state"]["state"]) == len(checkpoint["model_state"])
    steps = [r["step"] for r in rows(uninterrupted)]
    assert steps == sorted(steps) and len(steps) == 30 + 3  # 30 train rows, 3 evals


def test_kill_9_during_checkpoint_write_then_resume_is_exact(env, tmp_path, uninterrupted):
    marker = tmp_path / "hanging"
    proc = start([*RUN, "--run_dir", "run"], env, tmp_path, "hang_in_checkpoint_write", marker)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    run_dir = tmp_path / "run"
    assert torch.load(run_dir / "latest.pt", weights_only=False)["step"] == 100  # the step-200 write never landed
    assert list(run_dir.glob("*.tmp-*"))  # the half-written temp file is there ...

    result = run(["--run_dir", "run"], env, tmp_path)  # the one documented resume command
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 100" in result.stdout
    assert not list(run_dir.glob("*.tmp-*"))  # ... and is cleaned up on resume
    assert_same_weights(run_dir / "latest.pt", uninterrupted / "latest.pt")
    assert rows(run_dir) == rows(uninterrupted)  # same values, no duplicate or missing row
    # wandb continues the same run: both offline run folders carry the one run id
    run_id = (run_dir / "wandb_run_id").read_text()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)


@pytest.mark.parametrize("sig, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_signal_checkpoints_and_resume_is_exact(env, tmp_path, uninterrupted, sig, exit_code):
    marker = tmp_path / "training"
    proc = start([*RUN, "--run_dir", "run"], env, tmp_path, "slow_updates", marker)
    wait_for(marker, proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == exit_code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "python algorithms/dt.py --run_dir run" in stdout  # how to resume
    stopped_at = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)["step"]
    assert 0 < stopped_at < 300

    result = run(["--run_dir", "run"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from step {stopped_at}" in result.stdout
    assert_same_weights(tmp_path / "run" / "latest.pt", uninterrupted / "latest.pt")
    assert rows(tmp_path / "run") == rows(uninterrupted)


def test_finished_run_is_not_repeated(env, uninterrupted):
    before = (uninterrupted / "metrics.jsonl").read_text()
    result = run(["--run_dir", str(uninterrupted)], env, uninterrupted.parent)
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert (uninterrupted / "metrics.jsonl").read_text() == before


def test_eval_only_reproduces_training_eval_and_takes_new_targets(env, tmp_path, uninterrupted):
    # the same targets, episodes and seed as training's last evaluation give the same returns
    result = run(["--eval_checkpoint", str(uninterrupted / "latest.pt"), "--runs_dir", "evals"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_dir,) = (tmp_path / "evals").iterdir()
    (row,) = rows(eval_dir)
    last_eval = [r for r in rows(uninterrupted) if "eval/3600.0_return_mean" in r][-1]
    assert row == last_eval
    assert "eval @ step 300" in result.stdout

    # any targets, episodes and seed from the command line; a run folder means its latest.pt
    result = run(["--eval_checkpoint", str(uninterrupted), "--target_returns", "[1000,500,250]",
                  "--eval_episodes", "3", "--eval_seed", "7", "--runs_dir", "evals2"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_dir,) = (tmp_path / "evals2").iterdir()
    (row,) = rows(eval_dir)
    assert {k for k in row if k.endswith("_return_mean")} == {f"eval/{t}_return_mean" for t in ("1000.0", "500.0", "250.0")}
    assert not (eval_dir / "latest.pt").exists()  # no training happened
    assert "250.0" in result.stdout


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, tmp_path):
    result = run([*RUN, "--run_dir", "run"], env, tmp_path, fault="nan_from_step_150", marker=tmp_path / "m")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "NaN/inf at step 150" in line and str(Path("run") / "latest.pt") in line
    checkpoint = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)
    assert checkpoint["step"] == 100
    assert all(torch.isfinite(v).all() for v in checkpoint["model_state"].values())
    assert max(r["step"] for r in rows(tmp_path / "run")) == 140  # nothing logged from the bad interval


def test_nan_from_a_diverging_learning_rate(env, tmp_path):
    result = run([*RUN, "--run_dir", "run", "--learning_rate", "1e30", "--warmup_steps", "0", "--clip_grad", "null"],
                 env, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "NaN/inf at step" in result.stderr and "no checkpoint was written yet" in result.stderr


def test_fields_set_to_their_default_value_still_override_the_saved_config(tmp_path):
    import dataclasses
    import dt
    saved = dataclasses.asdict(dt.TrainConfig(eval_episodes=20, eval_seed=7, env_name="hopper-medium-v2"))
    cli = dt.parse_config(["--eval_checkpoint", "x.pt", "--eval_episodes", "100", "--eval_seed=42"])
    config = dt.saved_config(cli, saved, allowed=("eval_episodes", "eval_seed", "eval_checkpoint"))
    assert (config.eval_episodes, config.eval_seed) == (100, 42)  # both equal TrainConfig's defaults
    (tmp_path / "c.yaml").write_text("eval_episodes: 100\n")
    cli = dt.parse_config(["--config_path", str(tmp_path / "c.yaml")])
    assert dt.saved_config(cli, saved, allowed=("eval_episodes",)).eval_episodes == 100
    cli = dt.parse_config([])  # nothing set: the saved values stay
    assert dt.saved_config(cli, saved, allowed=("eval_episodes",)).eval_episodes == 20
