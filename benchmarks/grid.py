"""Run a grid of DT runs (configs x seeds, with field overrides) on one machine, or write it as a wandb sweep.

One machine, several runs at a time; each run gets the folder <grid_dir>/<config label>-seed<k>, so the
same command skips finished runs and resumes unfinished ones (algorithms/dt.py --run_dir does both):

    python benchmarks/grid.py run --configs configs/dt/hopper/*.yaml --seeds 0 1 2 3 \\
        --grid_dir runs/grid-hopper --parallel 2 [--set update_steps=50000 --set eval_episodes=10]

Many machines: the same grid as a wandb sweep (method grid over config_path x train_seed):

    python benchmarks/grid.py sweep --configs configs/dt/hopper/*.yaml --seeds 0 1 2 3 --out sweeps/hopper.yaml
    wandb sweep sweeps/hopper.yaml          # prints the sweep id: <entity>/<project>/<id>
    wandb agent <entity>/<project>/<id>     # on each machine, from the repository root

The config label is the config's path under configs/dt with '/' -> '-' (configs/dt/hopper/medium_v2.yaml ->
hopper-medium_v2), or the file's stem for a config elsewhere. Then `python benchmarks/report.py <grid_dir>`.
"""
import argparse
import contextlib
import fcntl
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Dict, List, Optional, Tuple

import pyrallis
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "algorithms"))
from dt import TrainConfig, UserError, checkpoint_dir, parse_config, validate_config  # noqa: E402
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
LOG_NAME = "grid.log"
LOCK_NAME = "grid.lock"
PLAN_NAME = "grid.json"


@dataclass
class GridRun:
    label: str  # folder name under grid_dir: <config label>-seed<k>
    config_path: str
    seed: int
    args: List[str]  # dt.py arguments that define the run (config, seed, overrides), in wandb's --key=value form
    config: TrainConfig = field(repr=False)  # what dt.py will parse from args


# ----------------------------------------------------------------------------------------------
# The plan: configs x seeds x overrides
# ----------------------------------------------------------------------------------------------
def parse_overrides(pairs: List[str]) -> List[Tuple[str, str]]:
    """KEY=VALUE strings -> (key, value); the value is kept as typed (dt.py parses it, YAML style)."""
    fields = set(TrainConfig.__dataclass_fields__)
    overrides = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE (e.g. --set update_steps=5000), got '{pair}'")
        if key in RESERVED_FIELDS:
            raise UserError(f"--set {key} is not allowed: the grid sets {', '.join(RESERVED_FIELDS)} itself "
                            "(use --configs and --seeds)")
        if key not in fields:
            raise UserError(f"--set {key}: TrainConfig has no field '{key}'; `python {DT_SCRIPT} --help` lists them")
        overrides.append((key, value))
    return overrides


def config_label(config_path: str) -> str:
    """configs/dt/hopper/medium_v2.yaml -> hopper-medium_v2; any other file -> its stem."""
    path = Path(config_path).resolve()
    try:
        relative = path.relative_to(CONFIGS_ROOT)
    except ValueError:
        relative = Path(path.name)
    return "-".join(relative.with_suffix("").parts)


def dt_args(config_path: str, seed: int, overrides: List[Tuple[str, str]]) -> List[str]:
    """The run's dt.py arguments, written --key=value as `wandb agent` writes them, so grid and sweep agree."""
    return [f"--config_path={config_path}", f"--train_seed={seed}", *(f"--{key}={value}" for key, value in overrides)]


def plan_grid(configs: List[str], seeds: List[int], overrides: List[Tuple[str, str]]) -> List[GridRun]:
    """Every (config, seed) run, each parsed and validated by dt.py's own code before anything starts."""
    if not configs or not seeds:
        raise UserError("give at least one config (--configs) and one seed (--seeds)")
    runs, seen, shown = [], {}, set()
    for config_path in configs:
        label = config_label(config_path)
        if label in seen and seen[label] != Path(config_path).resolve():
            raise UserError(f"{config_path} and {seen[label]} would share the run folders '{label}-seed*'; "
                            "rename one of them")
        seen[label] = Path(config_path).resolve()
        for seed in seeds:
            args = dt_args(config_path, seed, overrides)
            config = parse_config(args)
            warnings = io.StringIO()
            try:
                with contextlib.redirect_stderr(warnings):  # dt.py's warnings, shown once per config below
                    validate_config(config)
            except UserError as err:
                raise UserError(f"{config_path}: {err}") from None
            for line in warnings.getvalue().splitlines():
                if line not in shown:
                    shown.add(line)
                    print(f"{config_path}: {line}", file=sys.stderr)
            run = GridRun(f"{label}-seed{seed}", config_path, seed, args, config)
            if run.label not in {r.label for r in runs}:  # a config or seed given twice runs once
                runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------
# State of a run folder
# ----------------------------------------------------------------------------------------------
def checkpoint_step(config: TrainConfig, run_dir: Path) -> Optional[int]:
    """The step of the run's latest.pt, or None when it has none (or one that cannot be read)."""
    latest = checkpoint_dir(config, run_dir) / "latest.pt"
    if not latest.exists():
        return None
    try:
        return int(torch.load(latest, map_location="cpu", weights_only=False)["step"])
    except Exception:  # a damaged checkpoint: dt.py reports it when it resumes
        return None


def config_conflicts(wanted: TrainConfig, saved: TrainConfig) -> List[str]:
    """Fields where a run folder's saved config differs from what the grid asks for."""
    saved_fields = asdict(saved)
    return [f"{name}: saved {saved_fields[name]!r}, grid {value!r}" for name, value in asdict(wanted).items()
            if name not in RESOURCE_FIELDS and saved_fields[name] != value]


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
    conflicts = config_conflicts(run.config, saved)
    if conflicts:
        return "conflict", "its config.yaml differs from the grid's: " + "; ".join(conflicts)
    step = checkpoint_step(saved, run_dir)
    if step is not None and step >= saved.update_steps:
        return "done", f"step {step}"
    return "resume", f"from step {step or 0} of {saved.update_steps}"


def last_logged_step(run_dir: Path) -> int:
    """The step of the last row of metrics.jsonl (0 before the first log)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    for line in reversed(path.read_text().splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a row cut off by a crash
            continue
    return 0


def write_plan(runs: List[GridRun], grid_dir: Path) -> None:
    """grid_dir/grid.json: every run this grid has been asked for (merged with earlier calls), so that
    benchmarks/report.py can list the runs that never started."""
    path = grid_dir / PLAN_NAME
    planned = {}
    if path.exists():
        try:
            planned = json.loads(path.read_text()).get("runs", {})
        except (json.JSONDecodeError, AttributeError):
            planned = {}
    for run in runs:
        planned[run.label] = {"config_path": run.config_path, "train_seed": run.seed, "args": run.args}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"runs": planned}, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Resources: GPUs round robin, CPU cores split
# ----------------------------------------------------------------------------------------------
def visible_gpus() -> List[str]:
    """GPU ids runs may use: CUDA_VISIBLE_DEVICES if set, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())]


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_resources(slot: int, parallel: int, config: TrainConfig, gpus: List[str], cores: int,
                  overrides: Dict[str, str]) -> Tuple[Dict[str, str], List[str], str]:
    """(environment, extra dt.py arguments, description) for the run in worker slot `slot`."""
    threads = max(1, cores // parallel)  # torch threads per run: the cores shared out, never oversubscribed
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    described = [f"{threads} thread{'s' if threads > 1 else ''}"]
    if gpus and config.device in ("auto", "cuda"):  # cuda:N names its GPU itself; cpu needs none
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        described.append(f"GPU {env['CUDA_VISIBLE_DEVICES']}")
    args = []
    if "eval_workers" not in overrides:
        # the run's share of what eval_workers -1 would take: one env worker per core it has
        args.append(f"--eval_workers={threads}")
        described.append(f"eval_workers {threads}")
    return env, args, ", ".join(described)


# ----------------------------------------------------------------------------------------------
# Running the grid
# ----------------------------------------------------------------------------------------------
def clock() -> str:
    return time.strftime("%H:%M:%S")


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def last_error_line(log: Path) -> str:
    """The line of the run's log that says what went wrong: its `error:` line, else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [""])[-1][:300]


@dataclass
class Running:
    run: GridRun
    process: subprocess.Popen
    lock: IO  # the run folder's lock, released when the run has exited
    started: float
    signals_sent: int = 0


def lock_run_folder(run_dir: Path) -> Optional[IO]:
    """An exclusive lock on run_dir/grid.lock, or None while another process holds it."""
    handle = open(run_dir / LOCK_NAME, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def start_run(run: GridRun, grid_dir: Path, slot: int, parallel: int, gpus: List[str], cores: int,
              overrides: Dict[str, str]) -> Optional[Tuple[subprocess.Popen, IO, str]]:
    """Start dt.py for the run in its folder, output appended to its grid.log; returns (process, lock,
    resources), or None when the folder is locked by a run still going (from another grid, or one killed)."""
    run_dir = grid_dir / run.label
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_folder(run_dir)
    if lock is None:
        return None
    env, extra, described = run_resources(slot, parallel, run.config, gpus, cores, overrides)
    command = [sys.executable, str(ROOT / DT_SCRIPT), *run.args, *extra, f"--run_dir={run_dir}"]
    with open(run_dir / LOG_NAME, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} grid: {' '.join(command)}\n")
        log.flush()
        # own session: a terminal's Ctrl+C reaches only the grid, which forwards it once
        # (dt.py takes a second SIGINT as "stop at once, without a checkpoint");
        # pass_fds: the run holds the folder's lock too, so it stays locked if this grid is killed
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                   start_new_session=True, pass_fds=(lock.fileno(),))
    return process, lock, described


def run_grid(runs: List[GridRun], grid_dir: Path, parallel: int, status_every: float, overrides: Dict[str, str],
             dry_run: bool = False) -> int:
    """Run every unfinished run, `parallel` at a time. Returns the exit code: 0 all finished, 1 a run failed,
    128 + signal when stopped by SIGINT/SIGTERM (forwarded to the runs, which checkpoint first)."""
    if parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    states = {run.label: run_state(run, grid_dir) for run in runs}
    pending = [run for run in runs if states[run.label][0] in ("new", "resume")]
    done = [run.label for run in runs if states[run.label][0] == "done"]
    failed = {run.label: f"not started: {states[run.label][1]}; use another --grid_dir or move "
              f"{grid_dir / run.label} away" for run in runs if states[run.label][0] == "conflict"}
    parallel = min(parallel, max(len(pending), 1))  # spare slots would only take cores from the runs
    gpus, cores = visible_gpus(), cpu_cores()
    count = {state: sum(s == state for s, _ in states.values()) for state in ("resume", "new")}
    print(f"grid {grid_dir}: {len(runs)} runs, {len(done)} finished (skipped), {count['resume']} to resume, "
          f"{count['new']} to start, {len(failed)} in conflict; {parallel} at a time on {len(gpus)} GPU(s) "
          f"and {cores} CPU core(s)", flush=True)
    for label, reason in failed.items():
        print(f"  {label}: {reason}", flush=True)
    if dry_run:
        for slot, run in enumerate(pending):
            env, extra, _ = run_resources(slot % parallel, parallel, run.config, gpus, cores, overrides)
            env_text = " ".join(f"{k}={v}" for k, v in env.items() if k != "PYTHONUNBUFFERED")
            print(f"  [{states[run.label][0]}] {env_text} python {DT_SCRIPT} {' '.join(run.args + extra)} "
                  f"--run_dir={grid_dir / run.label}")
        return 1 if failed else 0
    try:
        grid_dir.mkdir(parents=True, exist_ok=True)
        write_plan(runs, grid_dir)
    except OSError as err:
        raise UserError(f"cannot write to {grid_dir} ({err.strerror or err}); choose another --grid_dir") from None

    stop_signals: List[int] = []  # signals received; the main loop forwards each one once to every child
    previous = {sig: signal.signal(sig, lambda signum, frame: stop_signals.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    running: Dict[int, Running] = {}  # worker slot -> its run
    stopped: List[str] = []
    last_status, announced = time.monotonic(), 0
    try:
        while (pending and not stop_signals) or running:
            for slot in range(parallel):
                if slot not in running and pending and not stop_signals:
                    run = pending.pop(0)
                    started = start_run(run, grid_dir, slot, parallel, gpus, cores, overrides)
                    if started is None:
                        reason = f"{grid_dir / run.label} is in use by another process (a run still going?)"
                        failed[run.label] = f"not started: {reason}"
                        print(f"[{clock()}] skipped {run.label}: {reason}", flush=True)
                        continue
                    process, lock, described = started
                    running[slot] = Running(run, process, lock, time.monotonic())
                    verb = "resuming" if states[run.label][0] == "resume" else "starting"
                    print(f"[{clock()}] {verb} {run.label} ({described}; log {grid_dir / run.label / LOG_NAME})",
                          flush=True)
            for job in running.values():
                while job.signals_sent < len(stop_signals):
                    try:
                        job.process.send_signal(stop_signals[job.signals_sent])
                    except ProcessLookupError:  # it has just exited
                        pass
                    job.signals_sent += 1
            if len(stop_signals) > announced:
                announced = len(stop_signals)
                name = signal.Signals(stop_signals[-1]).name
                what = "checkpoint and stop" if announced == 1 else "stop at once"
                print(f"[{clock()}] {name}: asked {len(running)} run(s) to {what}; waiting for them"
                      + (" (send again to stop them at once)" if announced == 1 else ""), flush=True)
            time.sleep(0.2)
            for slot, job in list(running.items()):
                code = job.process.poll()
                if code is None:
                    continue
                del running[slot]
                job.lock.close()
                label, run_dir = job.run.label, grid_dir / job.run.label
                took = duration(time.monotonic() - job.started)
                if code == 0 and run_state(job.run, grid_dir)[0] == "done":
                    done.append(label)
                    outcome = f"finished {label} in {took}"
                elif code == 130 or (code == 0 and stop_signals):  # dt.py checkpointed and stopped on a signal
                    stopped.append(label)
                    outcome = (f"stopped {label} after {took} at step {last_logged_step(run_dir)} (exit {code}); "
                               "the same command resumes it")
                else:
                    failed[label] = f"exit {code}: {last_error_line(run_dir / LOG_NAME)} (log {run_dir / LOG_NAME})"
                    outcome = f"FAILED {label} after {took}, {failed[label]}"
                print(f"[{clock()}] {outcome}  [{len(done)} done, {len(running)} running, {len(failed)} failed, "
                      f"{len(pending)} waiting]", flush=True)
            if running and time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                progress = ", ".join(f"{j.run.label} step {last_logged_step(grid_dir / j.run.label)}/"
                                     f"{j.run.config.update_steps}" for j in running.values())
                print(f"[{clock()}] running: {progress}  [{len(done)} done, {len(failed)} failed, "
                      f"{len(pending)} waiting]", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    not_started = [run.label for run in pending]
    print(f"grid {grid_dir}: {len(done)} of {len(runs)} runs finished, {len(failed)} failed, "
          f"{len(stopped) + len(not_started)} not finished", flush=True)
    for label, reason in failed.items():
        print(f"  FAILED {label}: {reason}", flush=True)
    if stopped or not_started:
        print(f"  stopped: {', '.join(stopped) or '-'}; not started: {', '.join(not_started) or '-'}; "
              "the same command continues them", flush=True)
    if stop_signals:
        return 128 + stop_signals[0]  # 130 for Ctrl+C, as dt.py
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# wandb sweep
# ----------------------------------------------------------------------------------------------
def sweep_spec(runs: List[GridRun], configs: List[str], seeds: List[int], overrides: List[Tuple[str, str]],
               runs_dir: str, name: str, project: Optional[str]) -> Dict:
    """A wandb sweep (method grid) over config_path x train_seed with the overrides fixed.

    `wandb agent` runs `python algorithms/dt.py --config_path=... --train_seed=... --key=value ...`
    (the default command, ${args}: every parameter as --name=value); values are strings dt.py parses
    as the command line does (null, [3600,1800]), so they are written as typed.
    """
    projects = {run.config.project for run in runs}
    parameters = {"config_path": {"values": list(dict.fromkeys(configs))},
                  "train_seed": {"values": list(dict.fromkeys(seeds))}}
    parameters.update({key: {"value": value} for key, value in overrides})
    parameters.setdefault("runs_dir", {"value": runs_dir})
    spec = {"program": DT_SCRIPT, "method": "grid", "name": name}
    if project or len(projects) == 1:  # a sweep logs to one project; wandb ignores the config's own
        spec["project"] = project or projects.pop()
    spec["parameters"] = parameters
    spec["command"] = ["${env}", "${interpreter}", "${program}", "${args}"]
    return spec


def write_sweep(spec: Dict, out: Path, command_line: str) -> None:
    header = (f"# wandb sweep: {len(spec['parameters']['config_path']['values'])} configs x "
              f"{len(spec['parameters']['train_seed']['values'])} seeds. Made by:\n#   {command_line}\n"
              f"# Use (from the repository root, on each machine):\n#   wandb sweep {out}\n"
              "#   wandb agent <entity>/<project>/<sweep id>\n")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(header + yaml.safe_dump(spec, sort_keys=False, default_flow_style=False))
        os.replace(tmp, out)
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror or err})") from None


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the grid on this machine"), ("sweep", "write the grid as a wandb sweep YAML")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--configs", nargs="+", required=True, help="config YAML files")
        sub.add_argument("--seeds", nargs="+", type=int, required=True, help="train_seed values")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a TrainConfig field for every run, as on dt.py's command line (repeatable)")
        if name == "run":
            sub.add_argument("--grid_dir", required=True, help="folder of the run folders <config label>-seed<k>")
            sub.add_argument("--parallel", type=int, default=1, help="runs at a time (cores split between them)")
            sub.add_argument("--status_every", type=float, default=60.0, help="seconds between progress lines")
            sub.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
        else:
            sub.add_argument("--out", required=True, help="sweep YAML to write")
            sub.add_argument("--runs_dir", help="runs_dir of the sweep's runs on each machine "
                             "(default runs/<out stem>)")
            sub.add_argument("--project", help="wandb project (default: the configs' project field)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        runs = plan_grid(args.configs, args.seeds, overrides)
        if args.command == "run":
            sys.exit(run_grid(runs, Path(args.grid_dir), args.parallel, args.status_every, dict(overrides),
                              args.dry_run))
        out = Path(args.out)
        spec = sweep_spec(runs, args.configs, args.seeds, overrides, args.runs_dir or f"runs/{out.stem}", out.stem,
                          args.project)
        write_sweep(spec, out, "python benchmarks/grid.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"wrote {out}: {len(runs)} runs ({len(set(args.configs))} configs x {len(set(args.seeds))} seeds); "
              f"start it with `wandb sweep {out}`, then `wandb agent <entity>/<project>/<id>` on each machine")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
