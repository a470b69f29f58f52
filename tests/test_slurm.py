"""benchmarks/grid.py --executor slurm on a real single-node SLURM (tools/local_slurm.py: munged, slurmctld and
slurmd as root, started once for this file): a grid completes and the report and `status` read it, submitting
again runs nothing twice (finished or still queued), `scontrol requeue` and a time limit both end in the weights
of an uninterrupted run, a config error fails once and shows in `status`, and bad input is refused before
anything is submitted. Without SLURM: the time-limit warning's requeue stops once a run no longer checkpoints.

Skipped when the SLURM binaries are absent (apt-get install -y slurm-wlm munge) or not root; in CI (CI=true)
that is a failure instead. The runs are tiny DTs on configs/dt/quickstart.yaml's bundled dataset.
"""
import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import dt
from conftest import ROOT

pytest.importorskip("submitit")  # --executor slurm submits through it (requirements-dev.txt)
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "benchmarks")]
import grid  # noqa: E402
import local_slurm  # noqa: E402

QUICKSTART = "configs/dt/quickstart.yaml"
TINY = {"embedding_dim": 16, "num_layers": 1, "batch_size": 8, "seq_len": 5, "warmup_steps": 2, "eval_episodes": 1,
        "target_returns": "[500]", "device": "cpu", "eval_workers": 0, "deterministic_torch": "true"}
SHORT = {**TINY, "update_steps": 40, "eval_every": 20, "log_every": 10}
LONG = {**TINY, "update_steps": 600, "eval_every": 200, "log_every": 10}  # interrupted after its first row


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The environment of a running single-node cluster (SLURM_CONF), stopped after the session."""
    missing = local_slurm.missing_binaries()
    if missing or os.geteuid() != 0:
        why = f"{', '.join(missing)} not found" if missing else "not root (slurmd runs as root)"
        message = f"needs a real SLURM, run as root: {why}; install it with {local_slurm.INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(local_slurm.start(folder), WANDB_MODE="disabled", HOME=str(folder / "home"))
    yield env
    local_slurm.stop(folder)


def grid_main(env, *args):
    """grid.main(args) in this process, with env's variables and from the repository root (sbatch hands the same
    environment to the tasks): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for key, value in env.items():
            patch.setenv(key, value)
        patch.chdir(ROOT)
        try:
            grid.main(list(args))
            code = 0
        except SystemExit as stopped:
            code = stopped.code
    return code, out.getvalue(), err.getvalue()


def sets(fields):
    return [arg for key, value in fields.items() for arg in ("--set", f"{key}={value}")]


def slurm_args(grid_dir, configs=(QUICKSTART,), fields=SHORT, *extra):
    return ["run", "--configs", *configs, "--seeds", "0", "--grid_dir", str(grid_dir), *sets(fields), "--executor",
            "slurm", "--time", "10", "--signal_delay", "60", "--cpus_per_task", "1", *extra]


def submit(env, *args):
    code, out, err = grid_main(env, *slurm_args(*args))
    assert code == 0, out + err
    return out


def slurm_run(env, *args):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=True).stdout


def job_state(env, job):
    out = slurm_run(env, "squeue", "-h", "-r", "--states=all", "-j", job, "-o", "%T")
    return out.strip()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def rows(run_dir: Path):
    return dt.read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []


def latest(run_dir: Path):
    return torch.load(run_dir / "latest.pt", map_location="cpu", weights_only=False)


def finished(run_dir: Path) -> bool:
    """The task noted that dt.py finished all its steps."""
    return (run_dir / "grid.log").exists() and "grid: finished in" in (run_dir / "grid.log").read_text()


def config_copy(folder: Path, name: str, **changes) -> str:
    """configs/dt/quickstart.yaml (its dataset by absolute path) as folder/<name>.yaml, with changes."""
    config = yaml.safe_load((ROOT / QUICKSTART).read_text())
    config["dataset_path"] = str(ROOT / config["dataset_path"])
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, **changes}))
    return str(path)


def test_grid_completes_report_reads_it_and_a_second_submission_runs_nothing(slurm, tmp_path):
    grid_dir = tmp_path / "grid"
    configs = (QUICKSTART, config_copy(tmp_path, "quickstart_half_lr", learning_rate=0.0005))
    command = subprocess.run([sys.executable, str(ROOT / "benchmarks/grid.py"), *slurm_args(grid_dir, configs)],
                             env=slurm, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = command.stdout
    assert command.returncode == 0, out + command.stderr
    array = re.search(r"submitted SLURM job array (\d+): 2 task\(s\)", out).group(1)
    assert f"squeue -r -j {array}" in out and f"status --grid_dir {grid_dir}" in out
    runs = [grid_dir / "quickstart-seed0", grid_dir / "quickstart_half_lr-seed0"]
    wait_for(lambda: all(finished(run) for run in runs), 240, "both runs to finish")
    for run in runs:
        log = (run / "grid.log").read_text()
        assert log.count("=== ") == 2 and f"(SLURM job {array}_" in log and "grid: finished in" in log
    assert latest(runs[1])["config"]["learning_rate"] == 0.0005

    report = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(grid_dir), "--out",
                             str(tmp_path / "report")], cwd=ROOT, env=slurm, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "report" / "results.csv").read_text()
    assert table.count("hopper-quickstart-medium-replay") == 2 and "Not averaged in" not in \
        (tmp_path / "report" / "results.md").read_text()

    status = grid_main(slurm, "status", "--grid_dir", str(grid_dir))[1].splitlines()
    for label, run in zip(("quickstart ", "quickstart_half_lr "), runs):
        row = next(line for line in status if line.startswith(label)).split()
        key = "eval/500.0_normalized_score_mean"
        score = [r[key] for r in rows(run) if key in r][-1]
        assert row[1:6] == ["0", "done", "40/40", f"{score:.2f}", "500"] and row[6].startswith(f"{array}_")
    assert status[-1] == "2 runs: 2 done, 0 running, 0 pending, 0 stopped, 0 failed"

    before = {run: (run / "metrics.jsonl").read_bytes() for run in runs}
    jobs = slurm_run(slurm, "squeue", "-h", "-r", "--states=all", "-o", "%i")
    again = submit(slurm, grid_dir, configs)
    assert "2 finished (skipped)" in again and "nothing to submit" in again and "submitted" not in again
    assert slurm_run(slurm, "squeue", "-h", "-r", "--states=all", "-o", "%i") == jobs
    assert {run: (run / "metrics.jsonl").read_bytes() for run in runs} == before


def dt_pid(run_dir: Path) -> int:
    """The pid of the dt.py process training in run_dir."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"dt.py") for a in args) and f"--run_dir={run_dir}".encode() in args:
            return int(proc.name)
    raise AssertionError(f"no dt.py process for {run_dir}")


@pytest.fixture(scope="module")
def interrupted(slurm, tmp_path_factory):
    """One run three times at once: uninterrupted on this machine, on SLURM requeued by `scontrol requeue` once it
    trains, and on SLURM taken to its time limit once it trains. For the time limit, the task's limit is shortened
    (scontrol update) so SLURM's next periodic time check sends the warning, and dt.py is frozen (SIGSTOP) until
    that warning has reached the task, so the limit lands mid-run however fast this machine trains."""
    base = tmp_path_factory.mktemp("interrupted")
    configs = [config_copy(base, name) for name in ("requeue", "timelimit")]  # the same run, in two folders
    reference = subprocess.Popen([sys.executable, str(ROOT / "algorithms/dt.py"), f"--config_path={configs[0]}",
                                  "--train_seed=0", *(f"--{key}={value}" for key, value in LONG.items()),
                                  f"--run_dir={base / 'reference'}"],
                                 env={**slurm, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    submit(slurm, base / "grid", configs, LONG)
    again = submit(slurm, base / "grid", configs, LONG)  # while they are queued or running
    assert again.count("already queued as SLURM job") == 2 and "nothing to submit" in again
    jobs = json.loads((base / "grid" / "grid.json").read_text())["slurm"]
    jobs = {name: jobs[f"{name}-seed0"] for name in ("requeue", "timelimit")}
    runs = {name: base / "grid" / f"{name}-seed0" for name in jobs}
    done, pid, events = set(), None, {}
    log = base / "grid" / "slurm" / f"{jobs['timelimit']}_0_log.out"

    def step() -> bool:
        nonlocal pid
        if "requeue" not in done and rows(runs["requeue"]):
            events["requeued_at"] = rows(runs["requeue"])[-1]["step"]
            slurm_run(slurm, "scontrol", "requeue", jobs["requeue"])
            done.add("requeue")
        if "limit" not in done and rows(runs["timelimit"]):
            pid = dt_pid(runs["timelimit"])
            os.kill(pid, signal.SIGSTOP)
            used = slurm_run(slurm, "squeue", "-h", "-j", jobs["timelimit"], "-o", "%M").strip().split(":")
            elapsed = sum(int(part) * 60 ** i for i, part in enumerate(reversed(used)))
            limit = math.ceil((elapsed + 45) / 60)  # ends 45 s or more from now; the warning (120 s) is due at once
            slurm_run(slurm, "scontrol", "update", f"JobId={jobs['timelimit']}", f"TimeLimit={limit}")
            events["limit"] = (elapsed, limit)
            done.add("limit")
        if "limit" in done and "thaw" not in done and log.exists() and "Caught signal SIGUSR2" in log.read_text():
            slurm_run(slurm, "scontrol", "update", f"JobId={jobs['timelimit']}", "TimeLimit=10")  # for the next attempt
            os.kill(pid, signal.SIGCONT)
            done.add("thaw")
        return reference.poll() is not None and all(finished(run) for run in runs.values())

    try:
        wait_for(step, 420, f"the interrupted runs to finish (so far: {done})")
    finally:
        if pid is not None and "thaw" not in done:
            os.kill(pid, signal.SIGCONT)
        reference.kill()
    assert reference.returncode == 0
    return {"reference": base / "reference", **runs, "events": events, "jobs": jobs, "base": base}


def assert_same_run(run_dir: Path, reference: Path):
    ours, theirs = latest(run_dir), latest(reference)
    assert ours["model_state"].keys() == theirs["model_state"].keys()
    assert all(torch.equal(ours["model_state"][k], theirs["model_state"][k]) for k in theirs["model_state"])
    assert rows(run_dir) == rows(reference)  # losses and evaluations too, rows logged after the checkpoint replaced


def test_scontrol_requeue_resumes_to_the_weights_of_an_uninterrupted_run(interrupted):
    run = interrupted["requeue"]
    log = (run / "grid.log").read_text()
    assert log.count(" grid (SLURM job ") == 2, log  # started twice: SLURM's requeue, not a second submission
    resumed = int(re.search(r"resuming from step (\d+)", log).group(1))
    assert 0 < resumed and f"stopped at step {resumed};" in log  # dt.py checkpointed on SLURM's SIGTERM
    assert_same_run(run, interrupted["reference"])


def test_time_limit_checkpoints_requeues_and_resumes_to_the_same_weights(interrupted):
    run, job = interrupted["timelimit"], interrupted["jobs"]["timelimit"]
    task_log = (interrupted["base"] / "grid" / "slurm" / f"{job}_0_log.out").read_text()
    assert "Caught signal SIGUSR2" in task_log and f"Requeued job {job}" in task_log
    assert "timelimit-seed0: stopped after" in task_log and "; requeued" in task_log
    log = (run / "grid.log").read_text()
    resumed = int(re.search(r"resuming from step (\d+)", log).group(1))
    assert 0 < resumed < LONG["update_steps"] and log.count(" grid (SLURM job ") == 2
    assert_same_run(run, interrupted["reference"])


def test_a_config_error_fails_once_and_status_shows_its_error(slurm, tmp_path):
    grid_dir = tmp_path / "grid"
    submit(slurm, grid_dir, (QUICKSTART,), {**SHORT, "eval_env": "Walker2d-v4"})  # 17-dim states, the data has 11
    job = json.loads((grid_dir / "grid.json").read_text())["slurm"]["quickstart-seed0"]
    wait_for(lambda: job_state(slurm, job) == "FAILED", 180, "the task to fail")
    log = (grid_dir / "quickstart-seed0" / "grid.log").read_text()
    assert log.count(" grid (SLURM job ") == 1 and "grid: FAILED" in log
    assert "Restarts=0" in slurm_run(slurm, "scontrol", "show", "job", job)
    status = grid_main(slurm, "status", "--grid_dir", str(grid_dir))[1]
    row = next(line for line in status.splitlines() if line.startswith("quickstart "))
    assert row.split()[2] == "failed" and job in row
    assert "error: dataset has state/action sizes 11/3 but env Walker2d-v4 has 17/6" in row


@pytest.mark.parametrize("case", ["no sbatch", "unknown partition", "time limit", "another grid", "bad time",
                                  "sbatch refuses"])
def test_bad_submissions_end_with_one_line_and_submit_nothing(case, slurm, tmp_path):
    grid_dir, extra, fields, env = tmp_path / "grid", [], SHORT, slurm
    if case == "no sbatch":
        env = {**slurm, "PATH": str(tmp_path)}
        message = "error: sbatch, squeue, srun, sinfo not on PATH: --executor slurm submits from a machine with " \
                  "SLURM's commands (a cluster's login node; for a test cluster: apt-get install -y slurm-wlm munge)"
    elif case == "unknown partition":
        extra = ["--partition", "gpu"]
        message = "error: partition 'gpu' does not exist here; sinfo lists: debug"
    elif case == "time limit":
        fields = {**SHORT, "update_steps": 10_000_000, "eval_every": 10_000_000}
        message = "error: --time 10 cannot hold one evaluation interval of quickstart-seed0: 10000000 updates take"
    elif case == "another grid":
        grid_dir.mkdir()
        other = {"runs": {"quickstart-seed0": {"args": [f"--config_path={QUICKSTART}", "--train_seed=0"]}}}
        (grid_dir / "grid.json").write_text(json.dumps(other))
        message = f"error: {grid_dir} holds another grid (quickstart-seed0: made with --config_path={QUICKSTART} " \
                  "--train_seed=0); choose another --grid_dir"
    elif case == "bad time":
        extra = ["--time", "12h"]
        message = "error: --time 12h: give minutes or [days-]hours:minutes:seconds (e.g. 720 or 12:00:00)"
    else:  # more memory than the node has: only sbatch knows, after submitit wrote its files
        extra = ["--mem", "100000G"]
        message = "error: sbatch refused the job array: Memory specification can not be satisfied; Batch job " \
                  "submission failed: Requested node configuration is not available"
    jobs = slurm_run(slurm, "squeue", "-h", "-r", "-o", "%i")  # pending or running (a refused job is FAILED)
    before = sorted(p.name for p in grid_dir.rglob("*")) if grid_dir.exists() else None
    code, _, err = grid_main(env, *slurm_args(grid_dir, (QUICKSTART,), fields, *extra))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert (sorted(p.name for p in grid_dir.rglob("*")) if grid_dir.exists() else None) == before
    assert slurm_run(slurm, "squeue", "-h", "-r", "-o", "%i") == jobs


@pytest.mark.parametrize("writes_checkpoints", [False, True])
def test_the_time_limit_warning_requeues_a_run_only_while_it_checkpoints(writes_checkpoints, tmp_path):
    """RunTask.checkpoint as submitit calls it on SLURM's warning (no SLURM needed): the process gets one SIGTERM
    and the task is requeued with itself, but not after 3 attempts in a row that left latest.pt as it was."""
    run_dir = tmp_path / "x-seed0"
    script = f"open({str(run_dir / 'latest.pt')!r}, 'w').write('ckpt'); " * writes_checkpoints + \
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); time.sleep(60)"
    task = grid.RunTask("x-seed0", [sys.executable, "-c", script], run_dir, run_dir / "latest.pt", {}, 10)
    answers = []
    for _ in range(4):
        assert task.start()
        time.sleep(1)  # the process has started and, if it does, written latest.pt
        answers.append(task.checkpoint())
        if answers[-1] is None:
            break
    log = (run_dir / "grid.log").read_text()
    assert log.count("grid: stopped after") == len(answers) and all(a is None or a.function is task for a in answers)
    if writes_checkpoints:
        assert len(answers) == 4 and None not in answers and "not requeued" not in log
    else:
        assert len(answers) == 3 and answers[-1] is None and None not in answers[:2]
        assert log.endswith("grid: FAILED, not requeued: 3 attempts in a row wrote no checkpoint; raise --time\n")


@pytest.mark.parametrize("text, minutes", [("90", 90), ("90:30", 91), ("2:00:00", 120), ("1-12", 2160),
                                           ("1-12:30", 2190), ("1-00:00:01", 1441), ("infinite", None)])
def test_slurm_times_read_as_sbatch_reads_them(text, minutes):
    assert grid.slurm_minutes(text) == minutes  # whole minutes, rounded up; sinfo's "infinite" has no limit
