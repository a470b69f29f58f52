"""Run a grid of DT runs (configs x seeds, with field overrides) on this machine or as one SLURM job array, see
where its runs stand, or write it as a wandb sweep. Each run gets the folder <grid_dir>/<config label>-seed<k>
(configs/dt/hopper/medium_v2.yaml -> hopper-medium_v2; a config elsewhere: its file's stem), so the same command
skips finished runs and resumes unfinished ones (algorithms/dt.py --run_dir does both):

    python benchmarks/grid.py run --configs configs/dt/hopper/*.yaml --seeds 0 1 2 3 \\
        --grid_dir runs/grid-hopper --parallel 2 [--set update_steps=50000 --set eval_episodes=10]
    python benchmarks/grid.py run ... --executor slurm --time 12:00:00 [--partition gpu --gpus_per_task 1]
    python benchmarks/grid.py status --grid_dir runs/grid-hopper
    python benchmarks/report.py runs/grid-hopper
    python benchmarks/grid.py sweep --configs ... --seeds ... --out sweeps/hopper.yaml   # machines without SLURM:
    wandb sweep sweeps/hopper.yaml; wandb agent <entity>/<project>/<id>   # the agent on each machine, from the repo

SLURM, preemption and sweeps on a cluster: docs/cluster.md.
"""
import argparse
import contextlib
import fcntl
import functools
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pyrallis
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "algorithms"))
from dt import (TrainConfig, UserError, checkpoint_dir, load_d4rl_hdf5, parse_config, prepare_data,  # noqa: E402
                validate_config)
from pyrallis.wrappers import docstring as pyrallis_docstring  # noqa: E402

# pyrallis re-reads every field's help comment from dt.py's source at each parse (about 2 s a parse here);
# the grid parses every (config, seed), so it reads each comment once
pyrallis_docstring.get_attribute_docstring = functools.lru_cache(maxsize=None)(
    pyrallis_docstring.get_attribute_docstring)

DT_SCRIPT = "algorithms/dt.py"
CONFIGS_ROOT = ROOT / "configs" / "dt"
# the grid sets these per run itself; overriding them would break the one-folder-per-(config, seed) layout
RESERVED_FIELDS = ("config_path", "train_seed", "run_dir", "eval_checkpoint")
# fields a resumed run may change (dt.py's own rule): where it runs, not what it computes
RESOURCE_FIELDS = ("run_dir", "device", "eval_workers")
LOG_NAME, LOCK_NAME, PLAN_NAME = "grid.log", "grid.lock", "grid.json"
STOP_CODES = (0, 130, -signal.SIGTERM, -signal.SIGINT)  # dt.py stopped on a signal (it checkpoints first)
STALLED_ATTEMPTS = 3  # SLURM attempts in a row without a new checkpoint before a task is no longer requeued


@dataclass
class GridRun:
    label: str  # folder name under grid_dir: <config label>-seed<k>
    config_path: str
    seed: int
    args: List[str]  # dt.py arguments that define the run (config, seed, overrides), in wandb's --key=value form
    config: TrainConfig = field(repr=False)  # what dt.py will parse from args


# --- The plan: configs x seeds x overrides ---
def parse_overrides(pairs: List[str]) -> List[Tuple[str, str]]:
    """KEY=VALUE strings -> (key, value); the value is kept as typed (dt.py parses it, YAML style)."""
    overrides = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE (e.g. --set update_steps=5000), got '{pair}'")
        if key in RESERVED_FIELDS:
            raise UserError(f"--set {key} is not allowed: the grid sets {', '.join(RESERVED_FIELDS)} itself "
                            "(use --configs and --seeds)")
        if key not in TrainConfig.__dataclass_fields__:
            raise UserError(f"--set {key}: TrainConfig has no field '{key}'; `python {DT_SCRIPT} --help` lists them")
        overrides.append((key, value))
    return overrides


def config_label(config_path: str) -> str:
    """configs/dt/hopper/medium_v2.yaml -> hopper-medium_v2; any other file -> its stem."""
    path = Path(config_path).resolve()
    return "-".join(path.relative_to(CONFIGS_ROOT).with_suffix("").parts if path.is_relative_to(CONFIGS_ROOT)
                    else [path.stem])


def plan_grid(configs: List[str], seeds: List[int], overrides: List[Tuple[str, str]]) -> List[GridRun]:
    """Every (config, seed) run, each parsed and validated by dt.py's own code before anything starts. Its
    arguments are written --key=value as `wandb agent` writes them, so grid and sweep agree."""
    runs, seen, shown = {}, {}, set()
    for config_path in configs:
        label = config_label(config_path)
        if seen.setdefault(label, Path(config_path).resolve()) != Path(config_path).resolve():
            raise UserError(f"{config_path} and {seen[label]} would share the run folders '{label}-seed*'; "
                            "rename one of them")
        for seed in seeds:
            if f"{label}-seed{seed}" in runs:  # a config or seed given twice runs once
                continue
            args = [f"--config_path={config_path}", f"--train_seed={seed}", *(f"--{k}={v}" for k, v in overrides)]
            config, warnings = parse_config(args), io.StringIO()
            try:
                with contextlib.redirect_stderr(warnings):  # dt.py's warnings, shown once per config below
                    validate_config(config)
            except UserError as err:
                raise UserError(f"{config_path}: {err}") from None
            for line in warnings.getvalue().splitlines():
                if line not in shown:
                    shown.add(line)
                    print(f"{config_path}: {line}", file=sys.stderr)
            runs[f"{label}-seed{seed}"] = GridRun(f"{label}-seed{seed}", config_path, seed, args, config)
    return list(runs.values())


# --- State of a run folder ---
def run_state(run: GridRun, grid_dir: Path) -> Tuple[str, str]:
    """('done' | 'resume' | 'new' | 'conflict', detail) for the run's folder."""
    run_dir = grid_dir / run.label
    if not (run_dir / "config.yaml").exists():
        return "new", ""
    try:
        with open(run_dir / "config.yaml") as f:
            saved = pyrallis.load(TrainConfig, f)
    except Exception as err:  # unreadable config.yaml: dt.py says how to fix it when the run starts
        return "resume", f"config.yaml unreadable ({type(err).__name__})"
    saved_fields = asdict(saved)
    conflicts = [f"{name}: saved {saved_fields[name]!r}, grid {value!r}" for name, value in asdict(run.config).items()
                 if name not in RESOURCE_FIELDS and saved_fields[name] != value]
    if conflicts:
        return "conflict", "its config.yaml differs from the grid's: " + "; ".join(conflicts)
    try:
        step = int(torch.load(checkpoint_dir(saved, run_dir) / "latest.pt", map_location="cpu",
                              weights_only=False)["step"])
    except Exception:  # no latest.pt yet, or a damaged one: dt.py reports that when it resumes
        step = 0
    if step >= saved.update_steps:
        return "done", f"step {step}"
    return "resume", f"from step {step} of {saved.update_steps}"


def last_logged_step(run_dir: Path) -> int:
    """The step of the last row of metrics.jsonl (0 before the first log)."""
    path = run_dir / "metrics.jsonl"
    for line in reversed(path.read_text().splitlines() if path.exists() else []):
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a row cut off by a crash
            return int(json.loads(line)["step"])
    return 0


def read_plan(grid_dir: Path) -> Dict:
    """grid_dir/grid.json: {"runs": {label: {config_path, train_seed, args}}, "slurm": {label: job id}}."""
    try:
        return json.loads((grid_dir / PLAN_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_plan(runs: List[GridRun], grid_dir: Path, jobs: Optional[Dict[str, str]] = None) -> None:
    """Add the runs (and their SLURM job ids) to grid.json, the record of every run this grid was asked for:
    benchmarks/report.py lists those that never started, `status` finds their SLURM tasks."""
    plan = read_plan(grid_dir)
    plan.setdefault("runs", {}).update({run.label: {"config_path": run.config_path, "train_seed": run.seed,
                                                    "args": run.args} for run in runs})
    plan.setdefault("slurm", {}).update(jobs or {})
    try:
        grid_dir.mkdir(parents=True, exist_ok=True)
        (grid_dir / (PLAN_NAME + ".tmp")).write_text(json.dumps(plan, indent=1) + "\n")
        os.replace(grid_dir / (PLAN_NAME + ".tmp"), grid_dir / PLAN_NAME)
    except OSError as err:
        raise UserError(f"cannot write to {grid_dir} ({err.strerror or err}); choose another --grid_dir") from None


# --- One run: dt.py in its folder, on this machine or in a SLURM task ---
class RunTask:
    """dt.py for one run in its folder, holding the folder's lock (inherited by dt.py, so a second grid or a rerun
    after a killed grid skips the run), its output appended to <folder>/grid.log between a start line and an
    outcome line. The local grid starts and polls it; each SLURM array task calls it. Standard library only:
    submitit pickles it by value, so a task runs it without importing torch or this file."""

    def __init__(self, label: str, command: List[str], run_dir: Path, latest: Path, env: Dict[str, str],
                 update_steps: int):
        self.label, self.command, self.env, self.update_steps = label, command, env, update_steps
        self.run_dir, self.log, self.latest, self.cwd = str(run_dir), str(run_dir / LOG_NAME), str(latest), os.getcwd()
        self.process = self.lock = self.checkpointed = None
        self.started, self.stalled = 0.0, 0  # stalled: SLURM attempts in a row that left latest.pt as it was

    def note(self, text: str) -> None:
        try:
            with open(self.log, "a") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} grid{text}\n")
        except OSError as err:  # its disk full or gone: the grid says it here and goes on with the other runs
            print(f"{self.label}: cannot write {self.log} ({err.strerror}); grid{text}", file=sys.stderr, flush=True)

    def start(self, wait: float = 0) -> bool:
        """Start dt.py; False when another process holds the folder's lock for `wait` seconds."""
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        self.lock, deadline = open(Path(self.run_dir) / LOCK_NAME, "w"), time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.lock.close()
                    return False
                time.sleep(5)
            except OSError:  # a shared file system without flock (Lustre without -o flock): no lock
                break
        self.started, self.checkpointed = time.time(), self.latest_mtime()  # progress: latest.pt rewritten
        job = "_".join(os.environ[k] for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID") if k in os.environ)
        job = job or os.environ.get("SLURM_JOB_ID")  # submitit submits a lone task as a plain job
        self.note(f"{f' (SLURM job {job})' if job else ''}: {' '.join(self.command)}")
        with open(self.log, "a") as log:
            # own session: Ctrl+C reaches only the grid, which forwards it once (a second one stops dt.py at once);
            # SIGUSR2 ignored: SLURM's time-limit warning reaches every process, checkpoint() answers it for dt.py
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, cwd=self.cwd,
                start_new_session=True, pass_fds=(self.lock.fileno(),),  # dt.py holds the lock too
                preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        return True

    def finish(self, code: int) -> str:
        """Note how dt.py ended in grid.log, release the folder: 'finished in', 'stopped after' or 'FAILED after'."""
        took = time.time() - self.started
        took = f"{int(took // 60)}m{int(took % 60):02d}s" if took >= 60 else f"{took:.0f}s"
        step = last_logged_step(Path(self.run_dir))
        if code == 0 and step >= self.update_steps:
            outcome = f"finished in {took}"
        elif code in STOP_CODES:
            outcome = f"stopped after {took} at step {step} (exit {code}); the same command resumes it"
        else:  # with the log's line that says what went wrong: its last `error:` line, else its last line
            lines = [line.strip() for line in Path(self.log).read_text(errors="replace").splitlines()
                     if line.strip() and not line.startswith("=== ")]
            error = ([line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]] or lines
                     or [""])[-1][:300]
            outcome = f"FAILED after {took}, exit {code}: {error} (log {self.log})"
        self.note(f": {outcome}")
        self.lock.close()
        return outcome

    def __call__(self) -> str:
        """A SLURM task: run dt.py to its end; raising makes the task fail (SLURM does not requeue it)."""
        if not self.start(wait=300):  # a node's crash leaves its lock on NFS until the lease ends
            raise RuntimeError(f"{self.run_dir} is in use by another process (a run still going?)")
        while self.process.poll() is None:  # not wait(): checkpoint() waits for dt.py from a signal handler
            time.sleep(1)
        outcome = self.finish(self.process.returncode)
        print(f"{self.label}: {outcome}", flush=True)
        if outcome.startswith("FAILED"):
            raise RuntimeError(outcome)
        return outcome

    def checkpoint(self):
        """submitit's call on SLURM's time-limit warning (SIGUSR2): one SIGTERM makes dt.py write latest.pt and exit,
        then the task is requeued, unless dt.py failed or STALLED_ATTEMPTS attempts in a row wrote no checkpoint."""
        import submitit

        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:  # the exit code without reaping it: the interrupted main loop may hold Popen's wait lock
                info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT)
                code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            except ChildProcessError:  # reaped by the main loop just before the signal
                code = self.process.returncode
            outcome = self.finish(code)
            self.stalled = 0 if self.latest_mtime() != self.checkpointed else self.stalled + 1
            why = ("dt.py failed" if outcome.startswith("FAILED") else
                   f"{self.stalled} attempts in a row wrote no checkpoint; raise --time"
                   if self.stalled >= STALLED_ATTEMPTS else "")
            print(f"{self.label}: {outcome}; {'not requeued: ' + why if why else 'requeued'}", flush=True)
            if why:
                self.note(f": FAILED, not requeued: {why}")
                return None
        self.process = self.lock = None  # neither is pickled for the requeued task
        return submitit.helpers.DelayedSubmission(self)

    def latest_mtime(self) -> Optional[float]:
        return os.stat(self.latest).st_mtime if os.path.exists(self.latest) else None


def make_task(run: GridRun, grid_dir: Path, threads: int, gpu: Optional[str], overrides: Dict[str, str]) -> RunTask:
    """`threads` torch threads and as many env workers (the run's share of what eval_workers -1 would take)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if gpu is not None and run.config.device in ("auto", "cuda"):  # cuda:N names its GPU itself; cpu needs none
        env["CUDA_VISIBLE_DEVICES"] = gpu
    run_dir = grid_dir / run.label
    command = [sys.executable, str(ROOT / DT_SCRIPT), *run.args,
               *([] if "eval_workers" in overrides else [f"--eval_workers={threads}"]), f"--run_dir={run_dir}"]
    return RunTask(run.label, command, run_dir, checkpoint_dir(run.config, run_dir) / "latest.pt", env,
                   run.config.update_steps)


def triage(runs: List[GridRun], grid_dir: Path) -> Dict[str, Tuple[str, str]]:
    """Each run's run_state, counted on a line (left open)."""
    states = {run.label: run_state(run, grid_dir) for run in runs}
    count = {state: sum(s == state for s, _ in states.values()) for state in ("done", "resume", "new", "conflict")}
    print(f"grid {grid_dir}: {len(runs)} runs, {count['done']} finished (skipped), {count['resume']} to resume, "
          f"{count['new']} to start, {count['conflict']} in conflict", end="", flush=True)
    return states


# --- This machine: `parallel` runs at a time, GPUs round robin, CPU cores split ---
def run_grid(runs: List[GridRun], grid_dir: Path, args: argparse.Namespace, overrides: Dict[str, str]) -> int:
    """Run every unfinished run, --parallel at a time. Returns the exit code: 0 all finished, 1 a run failed,
    128 + signal when stopped by SIGINT/SIGTERM (forwarded to the runs, which checkpoint first)."""
    if args.parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {args.parallel}")
    states = triage(runs, grid_dir)
    pending = [run for run in runs if states[run.label][0] in ("new", "resume")]
    outcomes = {label: "finished" if state == "done" else
                f"FAILED not started: {detail}; use another --grid_dir or move {grid_dir / label} away"
                for label, (state, detail) in states.items() if state in ("done", "conflict")}
    parallel = min(args.parallel, max(len(pending), 1))  # spare slots would only take cores from the runs
    gpus = [gpu.strip() for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip() not in ("", "-1")] \
        if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(torch.cuda.device_count())]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // parallel)  # torch threads per run: the cores shared out, never oversubscribed
    print(f"; {parallel} at a time on {len(gpus)} GPU(s) and {cores} CPU core(s), {threads} thread(s)"
          f"{'' if 'eval_workers' in overrides else f' and eval_workers {threads}'} each", flush=True)
    print("".join(f"  {label}: {outcome[7:]}\n" for label, outcome in outcomes.items() if outcome[:6] == "FAILED"),
          end="", flush=True)
    gpu = (lambda slot: gpus[slot % len(gpus)]) if gpus else (lambda slot: None)
    if args.dry_run:
        for task in [make_task(run, grid_dir, threads, gpu(i % parallel), overrides) for i, run in enumerate(pending)]:
            print(f"  [{states[task.label][0]}] {' '.join(f'{k}={v}' for k, v in task.env.items())} "
                  f"{' '.join(task.command)}")
        return int(any(outcome.startswith("FAILED") for outcome in outcomes.values()))
    write_plan(runs, grid_dir)
    signals: List[int] = []  # received; the main loop forwards each one once to every running run
    previous = {sig: signal.signal(sig, lambda signum, frame: signals.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    running: Dict[int, RunTask] = {}  # worker slot -> its run
    last_status, forwarded = time.monotonic(), 0

    def say(text: str, counts: bool = False) -> None:
        done, failed = (sum(o.startswith(word) for o in outcomes.values()) for word in ("finished", "FAILED"))
        print(f"[{time.strftime('%H:%M:%S')}] {text}" + (f"  [{done} done, {len(running)} running, {failed} failed, "
                                                          f"{len(pending)} waiting]" if counts else ""), flush=True)

    try:
        while (pending and not signals) or running:
            for slot in sorted(set(range(parallel)) - set(running)):
                if not pending or signals:
                    break
                run = pending.pop(0)
                task = make_task(run, grid_dir, threads, gpu(slot), overrides)
                if not task.start():
                    reason = f"{task.run_dir} is in use by another process (a run still going?)"
                    outcomes[run.label] = f"FAILED not started: {reason}"
                    say(f"skipped {run.label}: {reason}")
                    continue
                running[slot], on_gpu = task, task.env.get("CUDA_VISIBLE_DEVICES")
                say(f"{'resuming' if states[run.label][0] == 'resume' else 'starting'} {run.label} "
                    f"({f'GPU {on_gpu}; ' if on_gpu else ''}log {task.log})")
            while forwarded < len(signals):
                for task in running.values():
                    task.process.send_signal(signals[forwarded])  # Popen skips a process that has exited
                say(f"{signal.Signals(signals[forwarded]).name}: asked {len(running)} run(s) to " + (
                    "stop at once" if forwarded else "checkpoint and stop; waiting for them (send again to stop them "
                    "at once)"))
                forwarded += 1
            time.sleep(0.2)
            for slot, task in list(running.items()):
                if task.process.poll() is not None:
                    del running[slot]
                    outcomes[task.label] = outcome = task.finish(task.process.returncode)
                    verb, _, rest = outcome.partition(" ")
                    say(f"{verb} {task.label} {rest}", counts=True)
            if running and time.monotonic() - last_status >= args.status_every:
                last_status = time.monotonic()
                say("running: " + ", ".join(f"{task.label} step {last_logged_step(Path(task.run_dir))}/"
                                            f"{task.update_steps}" for task in running.values()), counts=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    failed = {label: outcome[7:] for label, outcome in outcomes.items() if outcome.startswith("FAILED")}
    stopped = [label for label, outcome in outcomes.items() if outcome.startswith("stopped")]
    print(f"grid {grid_dir}: {len(runs) - len(failed) - len(stopped) - len(pending)} of {len(runs)} runs "
          f"finished, {len(failed)} failed, {len(stopped) + len(pending)} not finished", flush=True)
    print("".join(f"  FAILED {label}: {reason}\n" for label, reason in failed.items()), end="", flush=True)
    if stopped or pending:
        print(f"  stopped: {', '.join(stopped) or '-'}; not started: {', '.join(run.label for run in pending) or '-'};"
              " the same command continues them", flush=True)
    return 128 + signals[0] if signals else int(bool(failed))  # 128 + 2 = 130 for Ctrl+C, as dt.py


# --- SLURM: one job array through submitit, one task per run ---
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
          "SIGNALING", "STAGE_OUT", "RESIZING")  # SLURM job states of a task not over yet


def slurm(*args: str) -> str:
    """A SLURM command's output; its error as a UserError."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"`{' '.join(args)}` did not answer ({err}); is SLURM's controller up?") from None
    if result.returncode:
        raise UserError(f"`{' '.join(args)}` failed: {(result.stderr or result.stdout).strip().splitlines()[-1]}")
    return result.stdout


def slurm_minutes(text: str) -> Optional[int]:
    """A SLURM time (minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]) in minutes,
    rounded up as SLURM does; None for infinite."""
    if text.strip().lower() in ("infinite", "unlimited"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise UserError(f"--time {text}: give minutes or [days-]hours:minutes:seconds (e.g. 720 or 12:00:00)")
    days, a, b, c = (int(x or 0) for x in match.groups())
    seconds = (((days * 24 + a) * 60 + b) * 60 + c if match.group(1) else  # days-hours[:minutes[:seconds]]
               (a * 60 + b) * 60 + c if match.group(4) else a * 60 + b)  # hours:minutes:seconds, minutes[:seconds]
    return -(-seconds // 60)


def check_slurm(runs: List[GridRun], args: argparse.Namespace) -> int:
    """SLURM answers, the partition exists, and the time limit fits it and holds one evaluation interval of every
    run at the update rate measured here; returns the limit in minutes."""
    missing = [name for name in ("sbatch", "squeue", "srun", "sinfo") if shutil.which(name) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not on PATH: --executor slurm submits from a machine with SLURM's "
                        "commands (a cluster's login node; for a test cluster: apt-get install -y slurm-wlm munge)")
    if args.time is None:
        raise UserError("--executor slurm needs --time, each task's time limit (e.g. 12:00:00); a run that needs "
                        "longer is requeued from its checkpoint")
    minutes = slurm_minutes(args.time)
    available = (minutes or 0) * 60 - args.signal_delay
    if available <= 0:
        raise UserError(f"--time {args.time} must be a finite limit longer than --signal_delay ({args.signal_delay} s)")
    limits = dict(line.split() for line in slurm("sinfo", "-h", "-o", "%P %l").splitlines() if line.strip())
    chosen = args.partition.split(",") if args.partition else [name for name in limits if name.endswith("*")]
    unknown = [name for name in chosen if name not in limits]  # sinfo marks the default partition with *
    if unknown:
        raise UserError(f"partition '{unknown[0]}' does not exist here; sinfo lists: "
                        f"{', '.join(name.rstrip('*') for name in limits)}")
    longest = [slurm_minutes(limits[name]) for name in chosen]
    if chosen and None not in longest and minutes > max(longest):
        raise UserError(f"--time {args.time} is over the time limit of partition {chosen[0].rstrip('*')}: "
                        f"{max(limits[name] for name in chosen)}")
    device = "cuda" if args.gpus_per_task else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("  --time is not checked against the evaluation interval: no GPU here to time an update on")
        return minutes
    from train_speed import time_updates, write_synthetic_d4rl

    measured, threads = {}, torch.get_num_threads()  # seconds per update of each model shape
    torch.set_num_threads(args.cpus_per_task)
    try:
        for run in runs:
            c = replace(run.config, compile=False)
            shape = (c.embedding_dim, c.num_layers, c.num_heads, c.seq_len, c.batch_size, c.micro_batch, c.bf16)
            if shape not in measured:  # dt.py's update on a synthetic 17-dim-state dataset, as train_speed.py times
                print(f"  timing {run.label}'s update on this {device.upper()} for the --time check", flush=True)
                with tempfile.TemporaryDirectory() as folder:
                    write_synthetic_d4rl(Path(folder) / "data.hdf5", 5_000)
                    data = prepare_data(load_d4rl_hdf5(Path(folder) / "data.hdf5"), c.reward_scale)
                measured[shape] = float(time_updates(c, data, torch.device(device), 1, 1)[1].sum())
                if measured[shape] < 0.1:  # 1 update after a warm-up one; the mean of 4 more when that was quick
                    measured[shape] = float(time_updates(c, data, torch.device(device), 4, 1)[1].sum())
            seconds = min(c.eval_every, c.update_steps) * measured[shape]
            if seconds > available:
                raise UserError(
                    f"--time {args.time} cannot hold one evaluation interval of {run.label}: "
                    f"{min(c.eval_every, c.update_steps)} updates take {seconds / 60:.0f} min at the "
                    f"{1 / measured[shape]:.1f} updates/s this model trains at on this machine's {device.upper()} with "
                    f"{args.cpus_per_task} thread(s), and --signal_delay keeps {args.signal_delay} s for the "
                    "checkpoint; raise --time or lower eval_every")
    finally:
        torch.set_num_threads(threads)
    return minutes


def queued_tasks(grid_dir: Path) -> Dict[str, Tuple[str, str, str]]:
    """label -> (job id, SLURM state, reason) of the grid's tasks SLURM still knows: squeue, and sacct where the
    cluster keeps accounting (squeue forgets a finished job after MinJobAge, 300 s by default)."""
    jobs, known = read_plan(grid_dir).get("slurm", {}), {}
    if not jobs:
        return {}
    with contextlib.suppress(UserError):  # no squeue here (or no answer): the run folders alone tell
        for line in slurm("squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%r").splitlines():
            job, state, reason = line.split("|")
            known[job] = (state, "" if reason == "None" else reason)
    missing = ",".join(sorted({job.split("_")[0] for job in jobs.values() if job not in known}))
    if missing:
        with contextlib.suppress(UserError):  # no sacct, or no accounting: squeue is all there is
            for line in slurm("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", missing).splitlines():
                known.setdefault(line.split("|")[0], (line.split("|")[1].split()[0], ""))
    return {label: (job, *known[job]) for label, job in jobs.items() if job in known}


def submit_slurm(runs: List[GridRun], grid_dir: Path, args: argparse.Namespace, overrides: Dict[str, str]) -> int:
    """Submit every unfinished run not queued already, as one job array; print how to follow it."""
    try:
        import cloudpickle
        import submitit
    except ImportError as err:
        raise UserError(f"--executor slurm needs {err.name}: pip install -r requirements-dev.txt") from None
    sbatch = {}
    for option in args.sbatch:  # account=abc -> --account=abc, exclusive -> --exclusive
        key, sep, value = option.strip().lstrip("-").partition("=")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
            raise UserError(f"--sbatch takes an sbatch option without its dashes, KEY=VALUE or KEY (e.g. --sbatch "
                            f"account=abc --sbatch exclusive), got '{option}'")
        sbatch[key] = value if sep else True
    states, plan = triage(runs, grid_dir), read_plan(grid_dir).get("runs", {})
    print(flush=True)
    other = [f"{label}: {detail}" for label, (state, detail) in states.items() if state == "conflict"] + \
        [f"{run.label}: made with {' '.join(plan[run.label].get('args', []))}" for run in runs
         if run.label in plan and plan[run.label].get("args") not in (None, run.args)]
    if other:
        raise UserError(f"{grid_dir} holds another grid ({other[0]}); choose another --grid_dir")
    queued = {label: job for label, (job, state, _) in queued_tasks(grid_dir).items() if state in ACTIVE}
    for label, job in queued.items():
        print(f"  {label}: already queued as SLURM job {job}, not submitted again")
    todo = [run for run in runs if states[run.label][0] != "done" and run.label not in queued]
    minutes = check_slurm(todo, args)
    tasks = [make_task(run, grid_dir, args.cpus_per_task, None, overrides) for run in todo]  # SLURM sets the GPUs
    if not tasks or args.dry_run:
        for task in tasks:
            print(f"  [{states[task.label][0]}] {' '.join(f'{k}={v}' for k, v in task.env.items())} "
                  f"{' '.join(task.command)}")
        print("nothing to submit" if not tasks else "dry run: nothing submitted")
        return 0
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # RunTask by value: tasks do not import this file
    folder = grid_dir / "slurm"
    created = [path for path in (grid_dir, folder) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to {grid_dir} ({err.strerror or err}); choose another --grid_dir") from None
    before = set(folder.iterdir())
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=10_000)  # RunTask limits the requeues
    executor.update_parameters(
        job_name=f"dt-{grid_dir.name}", partition=args.partition, time=minutes, cpus_per_task=args.cpus_per_task,
        gres=f"gpu:{args.gpus_per_task}" if args.gpus_per_task else None, mem=args.mem, setup=args.setup,
        array_parallelism=args.max_running or len(tasks), signal_delay_s=args.signal_delay, stderr_to_stdout=True,
        additional_parameters={"requeue": True, **sbatch})
    try:
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():  # submitit prints sbatch's errors too
            jobs = [executor.submit(task) for task in tasks]
    except Exception as err:  # sbatch refused it: nothing of this submission is left behind
        for path in set(folder.iterdir()) - before:
            path.unlink()
        for path in reversed(created):
            shutil.rmtree(path, ignore_errors=True)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        errors = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line] or lines[-1:]
        raise UserError(f"sbatch refused the job array: {'; '.join(dict.fromkeys(errors))}") from None
    array = jobs[0].job_id.split("_")[0]
    write_plan(runs, grid_dir, {task.label: job.job_id for task, job in zip(tasks, jobs)})  # after: no half plan
    print(f"submitted SLURM job array {array}: {len(jobs)} task(s)"
          f"{f', at most {args.max_running} at once' if args.max_running else ''}\n"
          f"  follow: python benchmarks/grid.py status --grid_dir {grid_dir}    (or squeue -r -j {array})\n"
          f"  logs:   {grid_dir}/<run>/{LOG_NAME} (dt.py), {folder}/{array}{'_<task>' * (len(jobs) > 1)}_0_log.out "
          "(the task)\n"
          f"  stop:   scancel {array}    (the runs checkpoint; the same command resubmits them)")
    return 0


# --- Status: every run of a grid, from its folder and SLURM ---
def status(grid_dir: Path) -> int:
    """One row per run: config, seed, state, step reached, last score at the highest target, SLURM job, note."""
    from report import read_run  # the report's reading of a run folder: both agree on what finished

    plan = read_plan(grid_dir)
    labels = sorted(set(plan.get("runs", {})) | {p.parent.name for name in (LOG_NAME, "config.yaml")
                                                  for p in grid_dir.glob(f"*/{name}")})
    if not labels:
        raise UserError(f"{grid_dir} holds no grid (no {PLAN_NAME}, no run folders); give a grid's --grid_dir")
    queue, rows = queued_tasks(grid_dir), []
    for label in labels:
        run_dir, log = grid_dir / label, grid_dir / label / LOG_NAME
        result = read_run(run_dir)  # None only for an eval-only folder
        job, queued, reason = queue.get(label, (plan.get("slurm", {}).get(label, "-"), "", ""))
        last = ([line for line in log.read_text(errors="replace").splitlines() if line.startswith("=== ")] or [""]
                )[-1].partition(" grid")[2] if log.exists() else ""
        try:  # a process on this machine (a grid, dt.py) holding the folder's lock: the run is going
            with open(run_dir / LOCK_NAME) as handle:  # read-only: no lock file is made where there is none
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            locked = False
        except OSError as err:  # no lock file, or no flock on this file system: not locked
            locked = isinstance(err, BlockingIOError)
        if queued in ("RUNNING", "COMPLETING", "SIGNALING") or locked:
            state, note = "running", ""
        elif queued in ACTIVE:
            state, note = "pending", f"{queued.lower()}{f' ({reason})' if reason else ''}"
        elif result and result.status == "finished":
            state, note = "done", ""
        elif ": FAILED" in last:
            state, note = "failed", last.partition(": ")[2]
        elif last:
            state, note = "stopped", "the grid command resumes it" if "stopped" in last else \
                "ended without an outcome line (killed)"
        else:
            state, note = "pending", "not queued: the grid command starts it"
        if queued and queued not in ACTIVE + ("COMPLETED",) and (queued, state) != ("FAILED", "failed"):
            note = f"SLURM {queued}; {note}"  # TIMEOUT, CANCELLED, PREEMPTED, NODE_FAIL, OUT_OF_MEMORY, ...
        step = f"{last_logged_step(run_dir)}/{yaml.safe_load((run_dir / 'config.yaml').read_text())['update_steps']}" \
            if (run_dir / "config.yaml").exists() else "-"
        score = f"{result.curve[-1][1]:.2f}" if result and result.curve else "-"
        target = f"{result.target:g}" if result and result.target is not None else "-"
        config, _, seed = label.rpartition("-seed")
        rows.append([config, seed, state, step, score, target, job, note])
    header = ["config", "seed", "state", "step", "last score", "target", "SLURM job", "note"]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{len(rows)} runs: " + ", ".join(f"{sum(row[2] == state for row in rows)} {state}"
                                            for state in ("done", "running", "pending", "stopped", "failed")))
    return 0


# --- wandb sweep ---
def write_sweep(runs: List[GridRun], args: argparse.Namespace, overrides: List[Tuple[str, str]],
                argv: List[str]) -> None:
    """The grid as a wandb sweep YAML (method grid over config_path x train_seed, the overrides fixed). `wandb agent`
    runs `python algorithms/dt.py --config_path=... --train_seed=... --key=value ...` (${args}), which dt.py parses
    as its command line (null, [3600,1800]), so values are written as typed."""
    out, projects = Path(args.out), {run.config.project for run in runs}
    parameters = {"config_path": {"values": list(dict.fromkeys(args.configs))},
                  "train_seed": {"values": list(dict.fromkeys(args.seeds))}, **{k: {"value": v} for k, v in overrides}}
    parameters.setdefault("runs_dir", {"value": args.runs_dir or f"runs/{out.stem}"})
    spec = {"program": DT_SCRIPT, "method": "grid", "name": out.stem}
    if args.project or len(projects) == 1:  # a sweep logs to one project; wandb ignores the config's own
        spec["project"] = args.project or projects.pop()
    spec.update(parameters=parameters, command=["${env}", "${interpreter}", "${program}", "${args}"])
    configs, seeds = len(parameters["config_path"]["values"]), len(parameters["train_seed"]["values"])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".tmp").write_text(
            f"# wandb sweep: {configs} configs x {seeds} seeds. Made by:\n"
            f"#   python benchmarks/grid.py {' '.join(argv)}\n"
            f"# Use (from the repository root, on each machine):\n#   wandb sweep {out}\n"
            "#   wandb agent <entity>/<project>/<sweep id>\n" + yaml.safe_dump(spec, sort_keys=False))
        os.replace(out.with_name(out.name + ".tmp"), out)
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror or err})") from None
    print(f"wrote {out}: {len(runs)} runs ({configs} configs x {seeds} seeds); start it with `wandb sweep {out}`, "
          "then `wandb agent <entity>/<project>/<id>` on each machine")


# --- Main ---
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="where every run of a grid stands").add_argument("--grid_dir", required=True)
    for name, help_text in (("run", "run the grid on this machine or submit it to SLURM"),
                            ("sweep", "write the grid as a wandb sweep YAML")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--configs", nargs="+", required=True, help="config YAML files")
        sub.add_argument("--seeds", nargs="+", type=int, required=True, help="train_seed values")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a TrainConfig field for every run, as on dt.py's command line (repeatable)")
        if name == "sweep":
            sub.add_argument("--out", required=True, help="sweep YAML to write")
            sub.add_argument("--runs_dir", help="the runs' runs_dir on each machine (default runs/<out stem>)")
            sub.add_argument("--project", help="wandb project (default: the configs' project field)")
            continue
        sub.add_argument("--grid_dir", required=True, help="folder of the run folders <config label>-seed<k>")
        sub.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
        sub.add_argument("--executor", choices=("local", "slurm"), default="local",
                         help="local: this machine; slurm: one SLURM job array, one task per run")
        sub.add_argument("--parallel", type=int, default=1, help="local: runs at a time (cores split between them)")
        sub.add_argument("--status_every", type=float, default=60.0, help="local: seconds between progress lines")
        slurm = sub.add_argument_group("slurm (docs/cluster.md)")
        slurm.add_argument("--time", help="each task's time limit, minutes or [days-]hours:minutes:seconds")
        slurm.add_argument("--partition", help="default: the cluster's default partition")
        slurm.add_argument("--gpus_per_task", type=int, default=0, help="GPUs per task (--gres=gpu:N)")
        slurm.add_argument("--cpus_per_task", type=int, default=1,
                           help="CPUs per task: dt.py's threads and eval_workers (unless --set eval_workers)")
        slurm.add_argument("--mem", help="memory per task, e.g. 16G (default: the partition's)")
        slurm.add_argument("--max_running", type=int, help="tasks running at once (the array's %%N)")
        slurm.add_argument("--signal_delay", type=int, default=300,
                           help="seconds before the time limit at which a run checkpoints and is requeued")
        slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                           help="any other sbatch option, without dashes (account=abc, qos=high; repeatable)")
        slurm.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                           help="shell line run before each task (module load ..., conda activate ...; repeatable)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        if args.command == "status":
            sys.exit(status(Path(args.grid_dir)))
        overrides = parse_overrides(args.set)
        runs = plan_grid(args.configs, args.seeds, overrides)
        if args.command == "sweep":
            return write_sweep(runs, args, overrides, argv if argv is not None else sys.argv[1:])
        sys.exit((submit_slurm if args.executor == "slurm" else run_grid)(runs, Path(args.grid_dir), args,
                                                                         dict(overrides)))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
