"""Return conditioning of a trained DT: the return it achieves against the return it is asked for.

    python benchmarks/conditioning.py runs/<run>/latest.pt --out results/conditioning

Evaluates the checkpoint at --targets target returns spread evenly from the dataset's lowest episode return
to 1.5x its highest (or at the --target_returns given), --episodes episodes each, all targets in ONE batched
rollout (dt.evaluate), and writes to --out:
  conditioning.csv   per target: the target and the achieved return (mean, std over episodes), raw and
                     normalized (D4RL's 0-100 scale, when the checkpoint has reference scores)
  conditioning.png   achieved (mean +- std) against target with the diagonal achieved = target, and beside
                     it the distribution of the dataset's episode returns, in normalized units when possible

The dataset (for its returns), the eval env and the reference scores come from the checkpoint's config, so
run it where training ran (a relative dataset_path is read from the current folder). Episode i of every target
starts from reset seed eval_seed + i, as in dt.py.
"""
import argparse
import csv
import functools
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
import dt  # noqa: E402

COLUMNS = ("target", "target_normalized", "return_mean", "return_std", "normalized_mean", "normalized_std", "episodes")


def default_targets(episode_returns: np.ndarray, count: int, top_factor: float = 1.5) -> np.ndarray:
    """count targets from the lowest episode return to top_factor x the highest, evenly spaced (rounded to 0.1)."""
    low, high = float(episode_returns.min()), float(episode_returns.max())  # float64: round to 0.1 exactly
    return np.round(np.linspace(low, top_factor * high, count), 1)


def conditioning(checkpoint_path: Path, targets: Optional[List[float]], count: int, episodes: int, eval_seed: int,
                 workers: int, device: torch.device) -> Dict:
    """Evaluate the checkpoint at every target in one batched rollout; returns the rows and what the plot needs."""
    checkpoint = dt.load_checkpoint(checkpoint_path)
    config = dt.saved_config(dt.TrainConfig(), checkpoint["config"], allowed=())
    source, raw = dt.load_dataset(config, dt.resolve_dataset(config))
    episode_returns = dt.prepare_data(raw, config.reward_scale).traj_returns  # every trajectory, held-out ones too
    targets = np.asarray(targets if targets else default_targets(episode_returns, count), dtype=np.float64)
    if len(set(targets.tolist())) != len(targets):
        raise dt.UserError(f"the targets {targets.tolist()} repeat a value; give distinct targets")
    eval_env = checkpoint.get("eval_env_spec") or checkpoint.get("eval_env")
    ref_min, ref_max = checkpoint.get("ref_min_score"), checkpoint.get("ref_max_score")
    model = dt.build_model(config, checkpoint["state_dim"], checkpoint["action_dim"]).to(device)
    model.load_state_dict(checkpoint["model_state"])
    envs = dt.EvalEnvs(functools.partial(dt.make_env, eval_env), len(targets) * episodes, workers)
    start = time.perf_counter()
    try:
        results = dt.evaluate(model, envs, tuple(targets.tolist()), episodes, eval_seed, checkpoint["state_mean"],
                              checkpoint["state_std"], config.reward_scale, device)
    finally:
        envs.close()
    seconds = time.perf_counter() - start

    def norm(x):
        return dt.normalized_score(np.asarray(x, dtype=np.float64), ref_min, ref_max) if ref_min is not None else None

    rows = []
    for target in targets.tolist():
        returns = results[target]["return"]  # evaluate() records each episode's return, length and ending
        scores = norm(returns)
        rows.append({"target": target, "target_normalized": norm(target), "return_mean": float(returns.mean()),
                     "return_std": float(returns.std()), "episodes": len(returns),
                     "normalized_mean": None if scores is None else float(scores.mean()),
                     "normalized_std": None if scores is None else float(scores.std())})
    return {"rows": rows, "episode_returns": episode_returns, "data_normalized": norm(episode_returns),
            "name": config.env_name, "step": checkpoint["step"], "train_targets": list(config.target_returns),
            "train_targets_normalized": norm(list(config.target_returns)), "seconds": seconds,
            "normalized": ref_min is not None}


def write_csv(rows: List[Dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    os.replace(tmp, path)


def plot(result: Dict, path: Path) -> None:
    """Achieved against target (mean +- std band, each mean a dot), the diagonal, and the dataset's returns beside."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    unit, rows = ("normalized", "target_normalized") if result["normalized"] else ("return", "target"), result["rows"]
    x = np.array([row[unit[1]] for row in rows])
    mean, std = (np.array([row[f"{unit[0]}_{k}"] for row in rows]) for k in ("mean", "std"))
    data = result["data_normalized"] if result["normalized"] else result["episode_returns"]
    fig, (ax, side) = plt.subplots(1, 2, sharey=True, figsize=(8, 4.5), dpi=120, gridspec_kw={"width_ratios": [3, 1]})
    low, high = min(x.min(), data.min()), max(x.max(), data.max())
    ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1, label="achieved = target")
    ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.25, linewidth=0)
    ax.plot(x, mean, color="C0", marker="o", markersize=4, label=f"achieved, mean ± std ({rows[0]['episodes']} episodes)")
    trained = result["train_targets_normalized"] if result["normalized"] else result["train_targets"]
    for i, target in enumerate(trained):
        ax.axvline(target, color="C1", linestyle=":", linewidth=1, label="training's eval targets" if i == 0 else None)
    label = "D4RL normalized score" if result["normalized"] else "return"
    ax.set_xlabel(f"target return ({label})")
    ax.set_ylabel(f"achieved return ({label})")
    ax.set_title(f"{result['name']}, step {result['step']}: return conditioning", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    side.hist(data, bins=30, orientation="horizontal", color="C2", alpha=0.7)
    side.axhline(np.mean(data), color="C2", linestyle="-.", linewidth=1)
    side.set_xlabel("dataset episodes")
    side.set_title(f"dataset: {len(data)} episodes,\nmean {np.mean(data):.1f}, max {np.max(data):.1f}", fontsize=9)
    side.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint of algorithms/dt.py (.pt file, or a run folder: its latest.pt)")
    parser.add_argument("--out", required=True, help="folder for conditioning.csv and conditioning.png")
    parser.add_argument("--targets", type=int, default=12, help="how many targets, lowest to 1.5x highest data return")
    parser.add_argument("--target_returns", type=float, nargs="+", help="these targets instead (raw returns)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per target")
    parser.add_argument("--eval_seed", type=int, default=42)
    parser.add_argument("--eval_workers", type=int, default=-1, help="as dt.py's eval_workers")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        if args.targets < 2 or args.episodes < 1:
            raise dt.UserError(f"--targets must be >= 2 and --episodes >= 1, got {args.targets} and {args.episodes}")
        device = dt.resolve_device(args.device)
        dt.keep_freed_memory()  # as dt.py's main() does
        result = conditioning(Path(args.checkpoint).expanduser(), args.target_returns, args.targets, args.episodes,
                              args.eval_seed, args.eval_workers, device)
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_csv(result["rows"], out / "conditioning.csv")
            plot(result, out / "conditioning.png")
        except OSError as err:
            raise dt.UserError(f"cannot write to {out} ({err.strerror or err}); choose another --out") from None
    except dt.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{result['name']} step {result['step']}: {len(result['rows'])} targets x {result['rows'][0]['episodes']} "
          f"episodes in one batched rollout, {result['seconds']:.1f} s")
    print(f"{'target':>10}  {'achieved return':>20}" + (f"  {'target (norm.)':>14}  {'achieved (norm.)':>18}"
                                                        if result["normalized"] else ""))
    for row in result["rows"]:
        line = f"{row['target']:>10.1f}  {row['return_mean']:>10.1f} +- {row['return_std']:<6.1f}"
        if result["normalized"]:
            line += f"  {row['target_normalized']:>14.2f}  {row['normalized_mean']:>8.2f} +- {row['normalized_std']:.2f}"
        print(line)
    print(f"wrote {out / 'conditioning.csv'} and {out / 'conditioning.png'}")


if __name__ == "__main__":
    main()
