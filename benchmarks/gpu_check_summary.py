"""The summary of benchmarks/gpu_check.sh: one table of its steps (ok or FAILED, seconds, figures), the projected
wall time of a full CORL-schedule run from the measured figures, and the targets met or not.

    python benchmarks/gpu_check_summary.py --log_dir <the folder gpu_check.sh wrote> [--dry_run]

Reads steps.tsv (name, exit status, seconds) and what each step left in the folder. Exit status 1 if a step
failed or was not reached, else 0. The targets are reported, never a reason to fail.
"""
import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "algorithms"))

STEPS = ("install", "cuda_tests", "train_speed_fp32", "train_speed_tf32", "train_speed_bf16", "train_speed_bf16_compile",
         "eval_speed", "train_run", "eval_only_cpu")
# the projection's preference
TRAIN_STEPS = ("train_speed_bf16_compile", "train_speed_bf16", "train_speed_tf32", "train_speed_fp32")
# CORL's schedule: 100k updates at batch 4096, an evaluation after the first update and every 5000 (21), each of
# 2 targets x 100 episodes of at most 1000 steps
FULL_UPDATES, FULL_EVALUATIONS, EVALUATION_STEPS = 100_000, 21, 2 * 100 * 1000
MFU_GOAL, SAMPLING_GOAL, EVAL_RATIO_GOAL, PROJECTED_GOAL_MIN = 0.40, 0.05, 20.0, 30.0


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_rows(path: Path) -> List[dict]:
    try:
        from dt import read_metrics  # the one metrics.jsonl reader
        return read_metrics(path)
    except (ImportError, OSError):  # no run, or an environment where dt does not import (its row says why)
        return []


def environment() -> str:
    """torch, the GPU, and the pins of requirements.txt that the installed packages do not meet."""
    try:
        import torch
        device = (f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if torch.cuda.is_available()
                  else "no CUDA device")
        found = f"torch {torch.__version__}, {device}"
    except ImportError as err:
        found = f"torch does not import ({err})"
    unmet = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", line.strip())
        if match:
            try:
                installed = metadata.version(match[1])
            except metadata.PackageNotFoundError:
                installed = "missing"
            if installed.split("+")[0] != match[2]:
                unmet.append(f"{match[1]} {installed} (pin {match[2]})")
    return found + (f"; pins not met: {', '.join(unmet)}" if unmet else "; every pin met")


def cuda_tests(log_dir: Path, dry_run: bool) -> Tuple[Optional[bool], str]:
    try:
        suite = ET.parse(log_dir / "cuda_tests.xml").getroot()
    except (OSError, ET.ParseError):
        return None, "no test report"
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    count = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    text = f"{passed} passed, {count['skipped']} skipped, {count['failures'] + count['errors']} failed"
    if not dry_run and passed == 0:
        return False, text + " (no CUDA test ran)"
    return None, text


def train_speed(log_dir: Path, name: str) -> Tuple[Optional[bool], str]:
    figures = read_json(log_dir / f"{name}.json")
    if not figures:
        return None, ""
    row = figures["rows"][-1]
    dtype, peak = figures["dtype"].replace("torch.", "") + (" (TF32)" if figures.get("tf32") else ""), row["peak_gflops"]
    peak = f"{peak / 1e3:.1f} TFLOP/s" if peak >= 1e3 else f"{peak:.0f} GFLOP/s"
    return None, (f"batch {row['batch']}: {row['updates_per_s']:.2f} updates/s, sampling {row['sampling']:.1%}, "
                  f"MFU {row['mfu']:.1%} of the {dtype} matmul peak {peak}")


def eval_speed(log_dir: Path) -> Tuple[Optional[bool], str]:
    figures = read_json(log_dir / "eval_speed.json")
    if not figures:
        return None, ""
    row = figures["rows"][0]
    return None, (f"{figures['episodes']} episodes: batched {row['steps_per_s']:.0f} episode-steps/s ({row['mode']}, "
                  f"{row['workers']} workers) vs {figures['one_at_a_time_steps_per_s']:.0f} one at a time: "
                  f"{row['ratio']:.1f}x")


def returns(rows: List[dict]) -> Dict[str, float]:
    """{target: return mean} of the last evaluation in rows."""
    last = [r for r in rows if any(k.endswith("_return_mean") for k in r)]
    if not last:
        return {}
    return {k[len("eval/"):-len("_return_mean")]: v for k, v in last[-1].items() if k.endswith("_return_mean")}


def train_run(log_dir: Path) -> Tuple[Optional[bool], str]:
    rows = read_rows(log_dir / "train_run" / "metrics.jsonl")
    if not rows:
        return None, ""
    try:
        import yaml
        config = yaml.safe_load((log_dir / "train_run" / "config.yaml").read_text())
        text = (f"{rows[-1]['step']} updates at batch {config['batch_size']} on {config['device']}, bf16 {config['bf16']}, "
                f"compile {config['compile']}, fused AdamW {config['fused_adamw']}")
    except (ImportError, OSError, KeyError, TypeError):
        text = f"{rows[-1]['step']} updates"
    losses = [r for r in rows if "train_loss" in r]
    if losses:
        text += f"; last train_loss {losses[-1]['train_loss']:.4f}"
    evaluated = returns(rows)
    if evaluated:
        text += "; eval return " + ", ".join(f"{t}: {v:.1f}" for t, v in evaluated.items())
    return None, text


def eval_only_cpu(log_dir: Path) -> Tuple[Optional[bool], str]:
    found = sorted((log_dir / "eval_only_cpu").glob("*/metrics.jsonl"))
    evaluated = returns(read_rows(found[-1])) if found else {}
    if not evaluated:
        return None, ""
    trained = returns(read_rows(log_dir / "train_run" / "metrics.jsonl"))
    return None, "the checkpoint's return on CPU " + ", ".join(
        f"{t}: {v:.1f}" + (f" (in training: {trained[t]:.1f})" if t in trained else "") for t, v in evaluated.items())


def step_figures(name: str, log_dir: Path, dry_run: bool) -> Tuple[Optional[bool], str]:
    """(False if the figures show a failure the exit status does not, else None; the figures' text)."""
    if name == "install":
        return None, "pip --dry-run: the pins resolve, nothing changed" if dry_run else "pip installed requirements.txt"
    if name == "cuda_tests":
        return cuda_tests(log_dir, dry_run)
    if name in TRAIN_STEPS:
        return train_speed(log_dir, name)
    return {"eval_speed": eval_speed, "train_run": train_run, "eval_only_cpu": eval_only_cpu}[name](log_dir)


def last_lines(path: Path, count: int) -> List[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    lines = [line.split("\r")[-1].rstrip() for line in text.splitlines()]  # a progress bar's last state
    return [line for line in lines if line][-count:]


def projection(log_dir: Path, ok: Dict[str, bool]) -> Tuple[List[str], List[Tuple[str, ...]]]:
    """The projected full-run wall time (lines to print) and the rows of the targets table."""
    def measured(names: Tuple[str, ...]) -> Tuple[str, Optional[dict]]:
        """The figures of the first of these training steps that passed, and what they were measured with."""
        for name in names:
            figures = read_json(log_dir / f"{name}.json") if ok.get(name) else None
            if figures:
                row = figures["rows"][-1]
                return (f"{name}: {figures['dtype'].replace('torch.', '')}{' (TF32)' if figures.get('tf32') else ''}, "
                        f"{'compiled' if figures['compile'] else 'eager'}, batch {row['batch']}"), row
        return f"no figure from {' or '.join(names)}", None

    (train_label, train), (bf16_label, bf16) = measured(TRAIN_STEPS), measured(TRAIN_STEPS[:2])
    evaluation = read_json(log_dir / "eval_speed.json") if ok.get("eval_speed") else None
    eval_label = f"eval_speed: {evaluation['episodes']} episodes" if evaluation else "no figure from eval_speed"
    minutes = None
    if train and evaluation:
        rate, eval_rate = train["updates_per_s"], evaluation["rows"][0]["steps_per_s"]
        train_min = FULL_UPDATES / rate / 60
        eval_min = FULL_EVALUATIONS * EVALUATION_STEPS / eval_rate / 60
        minutes = train_min + eval_min
        lines = [f"Projected full CORL-schedule run: {FULL_UPDATES} updates / {rate:.2f} updates/s = {train_min:.1f} min, "
                 f"+ {FULL_EVALUATIONS} evaluations x {EVALUATION_STEPS} episode-steps / {eval_rate:.0f} episode-steps/s "
                 f"= {eval_min:.1f} min: {minutes:.1f} min",
                 f"(updates/s of {train_label}; every episode counted at its full 1000 steps, an upper bound; "
                 "start-up and compilation not counted)"]
    else:
        lines = ["Projected full CORL-schedule run: no figure (it needs a passed training speed step and eval_speed)"]

    def target(name: str, source: str, value: Optional[float], text: str, goal: str, met: bool) -> Tuple[str, ...]:
        return (name, source, "-", goal, "-") if value is None else (name, source, text, goal, "met" if met else "NOT met")

    mfu, sampling = (bf16["mfu"], bf16["sampling"]) if bf16 else (None, None)
    ratio = evaluation["rows"][0]["ratio"] if evaluation else None
    return lines, [
        target("training MFU, bf16 at batch 4096", bf16_label, mfu, f"{mfu or 0:.1%}", f">= {MFU_GOAL:.0%}",
               (mfu or 0) >= MFU_GOAL),
        target("sampling share of an update", bf16_label, sampling, f"{sampling or 0:.1%}", f"< {SAMPLING_GOAL:.0%}",
               (sampling or 0) < SAMPLING_GOAL),
        target("batched evaluation vs one episode at a time", eval_label, ratio, f"{ratio or 0:.1f}x",
               f">= {EVAL_RATIO_GOAL:.0f}x", (ratio or 0) >= EVAL_RATIO_GOAL),
        target("projected full CORL-schedule run", f"{train_label}; {eval_label}", minutes, f"{minutes or 0:.1f} min",
               f"< {PROJECTED_GOAL_MIN:.0f} min", (minutes or 0) < PROJECTED_GOAL_MIN),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log_dir", required=True, type=Path)
    parser.add_argument("--dry_run", action="store_true")
    args = parser.parse_args()
    log_dir = args.log_dir
    ran = {}
    for line in (log_dir / "steps.tsv").read_text().splitlines():
        name, status, seconds = line.split("\t")
        ran[name] = (status, int(seconds))

    table, ok, failed = [], {}, []
    for name in STEPS:
        if name not in ran:
            continue
        status, seconds = ran[name]
        verdict, text = step_figures(name, log_dir, args.dry_run)
        if status == "not_run":
            result, text = "not run", "--no_install: the environment as it is"
        elif status == "budget":
            result, text = "FAILED", "not started: the time budget was spent"
        else:
            result = "ok" if status == "0" and verdict is not False else "FAILED"
        if result == "FAILED" and status not in ("0", "budget"):  # why, in the log's last line
            why = f"timed out after {seconds} s" if status in ("124", "137") else f"exit status {status}"
            tail = last_lines(log_dir / f"{name}.log", 1)
            text = "; ".join(x for x in (text, f"{why}: {tail[0][:160] if tail else 'no output'}") if x)
        ok[name] = result == "ok"
        if result == "FAILED":
            failed.append(name)
        table.append((name, result, seconds, text))

    for name in failed:
        lines = last_lines(log_dir / f"{name}.log", 15)
        if lines:
            print(f"--- {name}: the last lines of {log_dir / (name + '.log')}")
            print("\n".join(lines))
    print()
    if args.dry_run:
        print("DRY RUN: the steps on CPU with tiny sizes; this exercises the script, its figures mean nothing.")
    print(f"GPU check summary: {environment()}; {os.cpu_count()} CPU cores. Each step's raw output: {log_dir}\n")
    print("| step | result | seconds | figures |")
    print("|---|---|---|---|")
    for name, result, seconds, text in table:
        print(f"| {name} | {result} | {seconds} | {text} |")
    lines, targets = projection(log_dir, ok)
    print("\n" + "\n".join(lines) + "\n")
    print("| target | measured with | figure | goal | result |")
    print("|---|---|---|---|---|")
    for row in targets:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(failed)} of {len(table)} steps failed" + (f": {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
