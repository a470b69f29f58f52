"""What SLURM costs `benchmarks/grid.py run --executor slurm`, measured on a real cluster: a single-node one started
here (tools/local_slurm.py; needs root and apt-get install -y slurm-wlm munge), or yours with --existing.

    python benchmarks/slurm_overhead.py [--folder /tmp/slurm-overhead] [--existing --partition P]

1. Submitting a 36-run grid (the 9 D4RL locomotion configs x 4 seeds; 10 updates each at batch 64 on the bundled
   dataset, one evaluation episode):
   seconds from the command to all 36 tasks queued (the command's wall time, then squeue lists them).
2. Per task: seconds from the task's start (SLURM's StartTime, whole seconds) to dt.py's first update (the first
   metrics.jsonl row; log_every 1), next to dt.py's own start-up, the same command run directly here.
3. A requeue's round trip, twice: `scontrol requeue` (SLURM's SIGTERM, as on a preemption) and the time-limit
   warning (SIGUSR2 from `scancel --signal=USR2`, what --signal sends before the limit): seconds from the
   signal until the run trains again, split into stopping (checkpoint), pending and start-up, and the updates
   redone (logged before the signal, after the checkpoint it resumed from).
Prints figures; asserts nothing. All runs use 1 CPU each (--cpus_per_task 1).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import local_slurm  # noqa: E402

D4RL = sorted(str(p.relative_to(ROOT)) for family in ("halfcheetah", "hopper", "walker2d")
              for p in (ROOT / "configs/dt" / family).glob("*_v2.yaml"))
DATA = ["dataset_path=data/hopper_medium_replay.hdf5", "eval_env=Hopper-v4", "device=cpu", "eval_workers=0",
        "batch_size=64", "target_returns=[3600]",
        "eval_episodes=1", "log_every=1"]


def sets(pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


def last_step(run_dir: Path) -> int:
    """The step of the last whole row of run_dir/metrics.jsonl, -1 before any."""
    path = run_dir / "metrics.jsonl"
    for line in reversed(path.read_text().splitlines() if path.exists() else []):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return -1


def first_row_time(run_dir: Path, timeout: float, after_step: int = -1) -> float:
    """When run_dir/metrics.jsonl first holds a row past `after_step` (polled every 0.05 s)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if last_step(run_dir) > after_step:
            return time.time()
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir}: no row past step {after_step} in {timeout} s")


def squeue(*fields: str) -> dict:
    out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "|".join(["%i", *fields])],
                         capture_output=True, text=True).stdout
    return {line.split("|")[0]: line.split("|")[1:] for line in out.splitlines()}


def grid(*args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/grid.py"), *args], cwd=ROOT, text=True,
                            capture_output=True)
    if result.returncode:
        sys.exit(result.stdout + result.stderr)
    return result.stdout


def dt_startup(folder: Path) -> float:
    """dt.py's own start-up: Popen to its first metrics row, one of the grid's commands run directly here."""
    start = time.time()
    process = subprocess.Popen([sys.executable, str(ROOT / "algorithms/dt.py"), f"--config_path={D4RL[0]}",
                                "--train_seed=0", "--update_steps=10", "--eval_every=10",
                                *(f"--{pair}" for pair in DATA), f"--run_dir={folder}"], cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    seconds = first_row_time(folder, 300) - start
    process.kill()
    process.wait()
    return seconds


def submit_36(folder: Path, slurm_args: list, per_task: bool) -> None:
    start = time.time()
    out = grid("run", "--configs", *D4RL, "--seeds", "0", "1", "2", "3", "--grid_dir", str(folder / "grid36"),
               *sets(DATA + ["update_steps=10", "eval_every=10"]), *slurm_args)
    took = time.time() - start
    array = re.search(r"job array (\d+)", out).group(1)
    queued = [job for job in squeue() if job.startswith(f"{array}_")]
    print(f"1. submitting 36 runs (9 configs x 4 seeds): {took:.1f} s from the command to {len(queued)} tasks queued "
          f"(job array {array})", flush=True)
    if not per_task:
        subprocess.run(["scancel", array])
        return
    plan = json.loads((folder / "grid36" / "grid.json").read_text())["slurm"]
    started, first = {}, {}
    while len(first) < len(plan):
        states = squeue("%T", "%S")
        for label, job in plan.items():
            if job in states and states[job][0] != "PENDING" and label not in started:
                started[label] = datetime.fromisoformat(states[job][1]).timestamp()
            if label not in first and last_step(folder / "grid36" / label) >= 0:
                first[label] = time.time()
        time.sleep(0.1)
    overhead = sorted(first[label] - started[label] for label in plan)
    print(f"2. per task, SLURM start -> dt.py's first update: median {statistics.median(overhead):.1f} s, "
          f"min {overhead[0]:.1f} s, max {overhead[-1]:.1f} s over {len(overhead)} tasks", flush=True)


def round_trip(folder: Path, slurm_args: list, how: str) -> None:
    """Requeue a training run (`how`: requeue or warning) and time its way back to training."""
    grid_dir = folder / f"roundtrip-{how}"
    grid("run", "--configs", "configs/dt/quickstart.yaml", "--seeds", "0", "--grid_dir", str(grid_dir),
         *sets(["embedding_dim=16", "num_layers=1", "batch_size=8", "seq_len=5", "update_steps=1000000",
                "eval_every=2000", "eval_episodes=1", "target_returns=[500]", "device=cpu", "eval_workers=0",
                "log_every=1"]),
         *slurm_args)
    job = json.loads((grid_dir / "grid.json").read_text())["slurm"]["quickstart-seed0"]
    run = grid_dir / "quickstart-seed0"
    first_row_time(run, 600)
    time.sleep(5)  # training steadily
    signal_at = time.time()
    command = ["scontrol", "requeue", job] if how == "requeue" else ["scancel", "--signal=USR2", job]
    subprocess.run(command, check=True)
    last = last_step(run)
    while (run / "grid.log").read_text().count(" grid: stopped") < 1:
        time.sleep(0.05)
    stopped_at = time.time()
    while squeue("%T").get(job, [""])[0] != "RUNNING" or (run / "grid.log").read_text().count(" (SLURM job ") < 2:
        time.sleep(0.05)
    running_at = time.time()
    checkpoint = int(re.search(r"stopped at step (\d+);", (run / "grid.log").read_text()).group(1))
    back_at = first_row_time(run, 600, after_step=checkpoint)
    subprocess.run(["scancel", job])
    print(f"3. {'scontrol requeue (SIGTERM)' if how == 'requeue' else 'time-limit warning (SIGUSR2)'}: "
          f"{back_at - signal_at:.1f} s from the signal to training again (stop and checkpoint "
          f"{stopped_at - signal_at:.1f} s, pending {running_at - stopped_at:.1f} s, start-up "
          f"{back_at - running_at:.1f} s); {max(0, last - checkpoint)} updates redone (logged step {last} at the "
          f"signal, resumed from {checkpoint})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/slurm-overhead", help="cluster state and the grids (emptied)")
    parser.add_argument("--existing", action="store_true", help="use the cluster of $SLURM_CONF / PATH")
    parser.add_argument("--partition")
    parser.add_argument("--parts", default="123", help="which measurements: 1 and 2 share one grid, 3 is separate")
    args = parser.parse_args()
    folder = Path(args.folder)
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if not args.existing:
        if local_slurm.missing_binaries():
            sys.exit(f"error: {', '.join(local_slurm.missing_binaries())} not found: {local_slurm.INSTALL}")
        os.environ.update(local_slurm.start(folder / "cluster"))
    slurm_args = ["--executor", "slurm", "--time", "60", "--cpus_per_task", "1"] + \
        (["--partition", args.partition] if args.partition else [])
    try:
        if "2" in args.parts:
            startups = sorted(dt_startup(folder / f"direct{i}") for i in range(3))
            print(f"dt.py's own start-up, the same command run directly here 3 times (Popen to first update): "
                  f"{', '.join(f'{s:.1f}' for s in startups)} s", flush=True)
        if "1" in args.parts or "2" in args.parts:
            submit_36(folder, slurm_args, per_task="2" in args.parts)
        if "3" in args.parts:
            round_trip(folder, slurm_args, "requeue")
            round_trip(folder, slurm_args, "warning")
    finally:
        if not args.existing:
            local_slurm.stop(folder / "cluster")


if __name__ == "__main__":
    main()
