"""benchmarks/grid.py: tiny real grids in parallel, skip and resume, Ctrl+C forwarding (and `status` of the run
before and after it), and the wandb sweep YAML. The SLURM executor: tests/test_slurm.py."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import dt
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import grid  # noqa: E402
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config  # noqa: E402

TINY_CONFIG = """env_name: hopper-medium-v2
embedding_dim: {embedding_dim}
num_layers: 1
seq_len: 5
batch_size: 8
update_steps: {update_steps}
warmup_steps: 2
eval_every: {eval_every}
log_every: {log_every}
eval_episodes: 1
target_returns: [3600]
device: cpu
"""


@pytest.fixture()
def grid_env(hopper_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="disabled", D4RL_DATASET_DIR=str(hopper_file.parent), HOME=str(tmp_path / "home"),
               http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    return env


def write_config(path: Path, embedding_dim: int = 16, update_steps: int = 4, eval_every: int = 2,
                 log_every: int = 1) -> str:
    path.write_text(TINY_CONFIG.format(embedding_dim=embedding_dim, update_steps=update_steps, eval_every=eval_every,
                                       log_every=log_every))
    return path.name


def grid_command(*args):
    return [sys.executable, str(ROOT / "benchmarks/grid.py"), *args]


def latest_step(run_dir: Path) -> int:
    return torch.load(run_dir / "latest.pt", map_location="cpu", weights_only=False)["step"]


def test_grid_runs_in_parallel_then_skips_finished_and_resumes_unfinished(grid_env, tmp_path):
    configs = [write_config(tmp_path / "a.yaml", embedding_dim=16), write_config(tmp_path / "b.yaml", embedding_dim=8)]
    command = grid_command("run", "--configs", *configs, "--seeds", "0", "1", "--grid_dir", "grid", "--parallel", "2",
                           "--set", "eval_workers=0")
    first = subprocess.run(command, env=grid_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    labels = ["a-seed0", "a-seed1", "b-seed0", "b-seed1"]
    assert sorted(p.name for p in (tmp_path / "grid").iterdir() if p.is_dir()) == labels
    lines = first.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if "] starting " in line]
    assert len(started) == 4 and not any("finished" in line for line in lines[started[0]:started[1]])  # 2 at once
    for label in labels:
        run_dir = tmp_path / "grid" / label
        config = dt.pyrallis.load(dt.TrainConfig, open(run_dir / "config.yaml"))
        assert config.train_seed == int(label[-1]) and config.embedding_dim == (16 if label[0] == "a" else 8)
        assert latest_step(run_dir) == 4 and config.eval_workers == 0
        assert "checkpoints:" in (run_dir / "grid.log").read_text()  # the run's own output went to its log
    before = {label: (tmp_path / "grid" / label / "metrics.jsonl").read_bytes() for label in labels}

    again = subprocess.run(command, env=grid_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 finished (skipped)" in again.stdout and "starting" not in again.stdout
    assert {label: (tmp_path / "grid" / label / "metrics.jsonl").read_bytes() for label in labels} == before

    # b-seed1 as a run stopped after its step-2 checkpoint leaves it: latest.pt at step 2, rows up to step 2
    stopped = tmp_path / "grid" / "b-seed1"
    checkpoint = torch.load(stopped / "latest.pt", map_location="cpu", weights_only=False)
    torch.save({**checkpoint, "step": 2}, stopped / "latest.pt")
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 2))
    resumed = subprocess.run(command, env=grid_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "3 finished (skipped), 1 to resume" in resumed.stdout and "resuming b-seed1" in resumed.stdout
    assert "resuming from step 2" in (stopped / "grid.log").read_text() and latest_step(stopped) == 4
    assert [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()] == \
        [r["step"] for r in rows]
    assert all((tmp_path / "grid" / label / "metrics.jsonl").read_bytes() == before[label] for label in labels[:3])
    plan = json.loads((tmp_path / "grid" / "grid.json").read_text())["runs"]
    assert sorted(plan) == labels and plan["b-seed1"]["args"][:2] == ["--config_path=b.yaml", "--train_seed=1"]


def grid_status(grid_dir: Path, monkeypatch, capsys):
    """`grid.py status` of a one-run grid: (its row split in cells, the summary line)."""
    monkeypatch.setenv("PATH", "")  # no squeue: the run folder alone tells
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:
        grid.main(["status", "--grid_dir", str(grid_dir)])
    lines = capsys.readouterr().out.splitlines()
    assert exit_code.value.code == 0
    monkeypatch.undo()
    return lines[1].split(), lines[-1]


def test_ctrl_c_is_forwarded_once_and_runs_checkpoint(grid_env, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "slow.yaml", update_steps=100000, eval_every=100000, log_every=10)
    process = subprocess.Popen(grid_command("run", "--configs", config, "--seeds", "0", "--grid_dir", "grid",
                                            "--set", "eval_workers=0"),
                               env=grid_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "grid" / "slow-seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:  # training has begun
        time.sleep(0.2)
    assert grid_status(tmp_path / "grid", monkeypatch, capsys)[0][:3] == ["slow", "0", "running"]  # its lock is held
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stdout + stderr
    row, summary = grid_status(tmp_path / "grid", monkeypatch, capsys)
    assert row[:3] == ["slow", "0", "stopped"] and summary == "1 runs: 0 done, 0 running, 0 pending, 1 stopped, 0 failed"
    assert "stopped slow-seed0" in stdout and "(exit 130)" in stdout
    log = (tmp_path / "grid" / "slow-seed0" / "grid.log").read_text()
    assert "stopped at step" in log  # one SIGINT: dt.py checkpointed (a second would have stopped it at once)
    assert 0 < latest_step(tmp_path / "grid" / "slow-seed0") < 100000


def test_sweep_yaml_runs_the_same_commands_as_the_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # wandb agent runs from the repository root, as dt.py's paths expect
    configs = ["configs/dt/hopper/medium_v2.yaml", "configs/dt/quickstart.yaml"]
    overrides = ["update_steps=50000", "target_returns=[3600,1800]", "clip_grad=null", "eval_episodes=10"]
    out = tmp_path / "sweep.yaml"
    grid.main(["sweep", "--configs", *configs, "--seeds", "0", "3", "--out", str(out),
               *itertools.chain.from_iterable(("--set", o) for o in overrides)])
    spec = load_sweep_config(str(out))  # what `wandb sweep` reads
    assert spec["method"] == "grid" and (ROOT / spec["program"]).is_file() and spec["project"] == "CORL"
    assert spec["parameters"]["config_path"]["values"] == configs
    assert spec["parameters"]["train_seed"]["values"] == [0, 3]
    planned = {(run.config_path, run.seed): run.config
               for run in grid.plan_grid(configs, [0, 3], grid.parse_overrides(overrides))}
    grid_values = [dict(zip(("config_path", "train_seed"), combo)) for combo in itertools.product(
        spec["parameters"]["config_path"]["values"], spec["parameters"]["train_seed"]["values"])]
    for values in grid_values:  # every run the sweep's grid makes, with wandb's own argument formatting
        params = {name: {"value": values.get(name, p.get("value"))} for name, p in spec["parameters"].items()}
        flags = create_sweep_command_args({"args": params})["args"]
        argv = [part for chunk in spec["command"]
                for part in ({"${env}": [], "${interpreter}": [], "${program}": [spec["program"]],
                              "${args}": flags}.get(chunk, [chunk]))]
        assert argv[0] == "algorithms/dt.py" and "--clip_grad=null" in argv
        config = dt.parse_config(argv[1:])
        expected = planned[(values["config_path"], values["train_seed"])]
        assert config.runs_dir == f"runs/{out.stem}"
        assert {**asdict(config), "runs_dir": None} == {**asdict(expected), "runs_dir": None}
        assert config.update_steps == 50000 and config.target_returns == (3600.0, 1800.0) and config.clip_grad is None


@pytest.mark.parametrize("args, message", [
    (["--set", "train_seed=1"], "error: --set train_seed is not allowed: the grid sets config_path, train_seed, "
                                "run_dir, eval_checkpoint itself (use --configs and --seeds)"),
    (["--set", "batchsize=8"], "error: --set batchsize: TrainConfig has no field 'batchsize'; "
                               "`python algorithms/dt.py --help` lists them"),
    (["--set", "batch_size"], "error: --set takes KEY=VALUE (e.g. --set update_steps=5000), got 'batch_size'"),
    (["--set", "batch_size=0"], "error: configs/dt/quickstart.yaml: batch_size must be a positive integer, got 0"),
    (["--parallel", "0"], "error: --parallel must be at least 1, got 0"),
])
def test_bad_grid_arguments_end_with_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stopped:
        grid.main(["run", "--configs", "configs/dt/quickstart.yaml", "--seeds", "0", "--grid_dir",
                   str(tmp_path / "grid"), *args])
    assert stopped.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "grid").exists()


def test_config_labels_are_unique_folder_names():
    assert grid.config_label(str(ROOT / "configs/dt/hopper/medium_v2.yaml")) == "hopper-medium_v2"
    assert grid.config_label(str(ROOT / "configs/dt/mujoco/hopper/medium_v0.yaml")) == "mujoco-hopper-medium_v0"
    assert grid.config_label("/elsewhere/my_idea.yaml") == "my_idea"
    with pytest.raises(dt.UserError, match="would share the run folders"):
        grid.plan_grid([str(ROOT / "configs/dt/quickstart.yaml"), "/tmp/elsewhere/quickstart.yaml"], [0], [])


def test_a_folder_in_use_is_not_started_twice(grid_env, tmp_path):
    config = write_config(tmp_path / "c.yaml")
    (tmp_path / "grid" / "c-seed0").mkdir(parents=True)
    with open(tmp_path / "grid" / "c-seed0" / "grid.lock", "w") as held:  # as a run of a killed grid holds it
        grid.fcntl.flock(held, grid.fcntl.LOCK_EX)
        result = subprocess.run(grid_command("run", "--configs", config, "--seeds", "0", "--grid_dir", "grid"),
                                env=grid_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "skipped c-seed0" in result.stdout and "FAILED c-seed0: not started" in result.stdout
    assert not (tmp_path / "grid" / "c-seed0" / "config.yaml").exists()
