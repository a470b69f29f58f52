"""How long benchmarks/report.py takes on a grid's worth of run folders, with and without its statistics and plots.

    python benchmarks/report_speed.py                  # 9 D4RL locomotion datasets + antmaze-umaze, 4 seeds: 40 runs
    python benchmarks/report_speed.py --seeds 6 --evaluations 20

Prints figures, asserts nothing. The run folders are written as algorithms/dt.py writes them (config.yaml and a
metrics.jsonl of training and evaluation rows) with random scores, in a temporary folder; each variant runs the
report in a fresh process, so the imports (rliable, arch, pandas, matplotlib) are counted as a user waits for them.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = [f"{env}-{kind}-v2" for env in ("halfcheetah", "hopper", "walker2d")
            for kind in ("medium", "medium-replay", "medium-expert")] + ["antmaze-umaze-v2"]


def write_runs(root: Path, seeds: int, evaluations: int, every: int = 1000) -> int:
    rng = np.random.default_rng(0)
    for dataset in DATASETS:
        for seed in range(seeds):
            folder = root / f"{dataset}-seed{seed}"
            folder.mkdir(parents=True)
            folder.joinpath("config.yaml").write_text(
                f"env_name: {dataset}\ntrain_seed: {seed}\nupdate_steps: {evaluations * every}\neval_every: {every}\n"
                f"target_returns: [3600.0, 1800.0]\nrun_dir: {folder}\n")
            rows = []
            for step in range(every, (evaluations + 1) * every, every):
                rows.append({"step": step, "train_loss": float(rng.uniform(0.01, 0.1)), "learning_rate": 1e-4})
                for target in (3600.0, 1800.0):
                    score = float(rng.uniform(10, 110))
                    rows.append({"step": step, f"eval/{target}_return_mean": 30 * score,
                                 f"eval/{target}_normalized_score_mean": score,
                                 f"eval/{target}_episode_length_mean": float(rng.uniform(100, 1000))})
            folder.joinpath("metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(DATASETS) * seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--evaluations", type=int, default=10, help="evaluations per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = write_runs(Path(tmp) / "runs", args.seeds, args.evaluations)
        print(f"{runs} run folders ({len(DATASETS)} datasets x {args.seeds} seeds, {args.evaluations} evaluations each)")
        for flags in (["--no_stats", "--no_plots"], ["--no_plots"], []):
            start = time.perf_counter()
            result = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(Path(tmp) / "runs"),
                                     "--out", str(Path(tmp) / "out"), *flags], capture_output=True, text=True)
            took = time.perf_counter() - start
            what = " ".join(flags) or "statistics and plots"
            print(f"  report.py {what}: {took:.1f} s" + ("" if result.returncode == 0 else f" (FAILED: {result.stderr[-300:]})"))


if __name__ == "__main__":
    main()
