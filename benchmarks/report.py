"""Result tables and learning curves from local run folders, beside the published DT scores.

    python benchmarks/report.py runs/grid-hopper [more folders ...] --out results/hopper

Reads every run folder under the given folders (config.yaml + metrics.jsonl, as algorithms/dt.py writes
them; no wandb needed) and writes to --out:
  results.md    a table per dataset family: last and best score at each run's highest target return,
                mean +- std over seeds, seed count, and the DT paper / CORL values where known
  results.csv   the same rows
  curves_<dataset>.png   the learning curves of each dataset (mean and +-std over seeds, each seed faint); when
                the runs logged val_loss (--val_fraction), a second panel with the training and held-out losses

Score: the D4RL normalized score at the run's highest target return (the number papers report); a run
logged without reference scores falls back to the return, marked so. "last" is a finished run's final
evaluation, "best" its best evaluation; both are averaged over seeds, std over seeds is the population
std (numpy's default, ddof=0, as CORL's tables). Runs that did not finish are listed with how far they
got and are not averaged in. Runs of one dataset whose configs differ (other than seed, folders, device
and speed settings) are kept apart as separate rows, and the differing fields are listed.
"""
import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyrallis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "algorithms"))
from dt import TrainConfig, UserError, normalized_score, read_metrics  # noqa: E402

# Published DT scores, normalized, at the highest target (/work reference table: DT paper, Chen et al. 2021;
# CORL's DT: "last" = mean +- std over 4 seeds of the final evaluation, "best" = mean of each seed's best)
# dataset: (DT paper, CORL last mean, CORL last std, CORL best)
PUBLISHED_SCORES: Dict[str, Tuple[Optional[float], ...]] = {
    "halfcheetah-medium-v2": (42.6, 42.20, 0.26, 42.73),
    "halfcheetah-medium-replay-v2": (36.6, 38.91, 0.50, 40.31),
    "halfcheetah-medium-expert-v2": (86.8, 91.55, 0.95, 93.40),
    "hopper-medium-v2": (67.6, 65.10, 1.61, 69.42),
    "hopper-medium-replay-v2": (82.7, 81.77, 6.87, 88.74),
    "hopper-medium-expert-v2": (107.6, 110.44, 0.33, 111.18),
    "walker2d-medium-v2": (74.0, 67.63, 2.54, 74.70),
    "walker2d-medium-replay-v2": (66.6, 59.86, 2.73, 68.22),
    "walker2d-medium-expert-v2": (108.1, 107.11, 0.96, 108.71),
    # CORL's antmaze "last" scores (the reference gives neither their std nor "best")
    "antmaze-umaze-v2": (None, 57.0, None, None),
    "antmaze-umaze-diverse-v2": (None, 51.75, None, None),
    "antmaze-medium-play-v2": (None, 0.0, None, None),
    "antmaze-medium-diverse-v2": (None, 0.0, None, None),
    "antmaze-large-play-v2": (None, 0.0, None, None),
    "antmaze-large-diverse-v2": (None, 0.0, None, None),
}
FAMILIES = ("hopper", "halfcheetah", "walker2d", "antmaze", "maze2d", "adroit", "other")
FAMILY_OF_TOKEN = {"hopper": "hopper", "halfcheetah": "halfcheetah", "walker2d": "walker2d", "antmaze": "antmaze",
                   "maze2d": "maze2d", "pointmaze": "maze2d", "pen": "adroit", "door": "adroit",
                   "hammer": "adroit", "relocate": "adroit"}
# fields that say where, how fast or under which name a run went, not what it learned: runs that differ
# only in these are seeds of one experiment
NOT_THE_EXPERIMENT = ("train_seed", "run_dir", "runs_dir", "checkpoints_path", "device", "eval_workers", "project",
                      "group", "name", "num_workers", "dataset_dir", "compile", "fused_adamw", "micro_batch",
                      "log_every", "deterministic_torch", "eval_checkpoint")
NORMALIZED, RETURN = "normalized", "return"


@dataclass
class RunResult:
    folder: Path
    status: str  # finished | partial | no metrics | not started | unreadable
    detail: str = ""  # how far an unfinished run got, or what is wrong with it
    env_name: str = ""
    seed: Optional[int] = None
    config_id: str = ""  # short hash of the fields that define the experiment
    experiment: Dict[str, Any] = field(default_factory=dict)  # those fields
    target: Optional[float] = None  # the highest target return
    metric: str = NORMALIZED
    curve: List[Tuple[int, float]] = field(default_factory=list)  # (step, mean score at target) per evaluation
    by_target: Dict[float, List[float]] = field(default_factory=dict)  # every target's score per evaluation
    losses: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # train_loss, val_loss: [(step, value)]
    data_mean: Optional[float] = None  # the training data's mean episode score, when its file records it


# ----------------------------------------------------------------------------------------------
# Reading run folders
# ----------------------------------------------------------------------------------------------
def dataset_family(env_name: str) -> str:
    """hopper-medium-v2 -> hopper; D4RL/pointmaze/umaze-v2 -> maze2d; pen-human-v1 -> adroit; else other."""
    for token in re.split(r"[-/_]", env_name.lower()):
        if token in FAMILY_OF_TOKEN:
            return FAMILY_OF_TOKEN[token]
    return "other"


def experiment_fields(config: TrainConfig) -> Dict[str, Any]:
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()
              if k not in NOT_THE_EXPERIMENT}
    fields["target_returns"] = sorted(fields["target_returns"])  # each target's episodes do not depend on the order
    if fields.get("dataset_path"):  # the file, not where a machine keeps it
        fields["dataset_path"] = Path(fields["dataset_path"]).name
    return fields


def config_id(fields: Dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:6]


def data_mean_score(config: TrainConfig, metric: str) -> Optional[float]:
    """The mean episode return of the run's own data file (HDF5 attribute dataset_mean_return, written by
    benchmarks/make_dataset.py), normalized like the run's scores; None when there is no such file or value."""
    if not config.dataset_path or not Path(config.dataset_path).is_file():
        return None
    try:
        import h5py
        with h5py.File(config.dataset_path, "r") as f:
            attrs = {k: f.attrs[k] for k in ("dataset_mean_return", "ref_min_score", "ref_max_score") if k in f.attrs}
    except (OSError, ImportError):
        return None
    if "dataset_mean_return" not in attrs:
        return None
    mean_return = float(attrs["dataset_mean_return"])
    if metric == RETURN:
        return mean_return
    ref_min = config.ref_min_score if config.ref_min_score is not None else attrs.get("ref_min_score")
    ref_max = config.ref_max_score if config.ref_max_score is not None else attrs.get("ref_max_score")
    return None if ref_min is None or ref_max is None else float(normalized_score(mean_return, ref_min, ref_max))


def read_run(folder: Path) -> Optional[RunResult]:
    """The run's evaluations at its highest target, and whether it finished; None for eval-only folders."""
    if not (folder / "config.yaml").exists():
        if (folder / "grid.log").exists():
            return RunResult(folder, "not started", "no config.yaml; see its grid.log")
        return RunResult(folder, "unreadable", "metrics.jsonl without config.yaml")
    try:
        with open(folder / "config.yaml") as f:
            config = pyrallis.load(TrainConfig, f)
    except Exception as err:
        return RunResult(folder, "unreadable", f"config.yaml cannot be read ({type(err).__name__})")
    if config.eval_checkpoint is not None:
        return None
    fields = experiment_fields(config)
    result = RunResult(folder, "no metrics", env_name=config.env_name, seed=config.train_seed,
                       config_id=config_id(fields), experiment=fields, target=max(config.target_returns))
    rows = read_metrics(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
    if not rows:
        result.detail = f"nothing logged (0 of {config.update_steps} steps)"
        return result
    return_key = f"eval/{result.target}_return_mean"  # dt.py formats targets as floats: eval/3600.0_...
    normalized_key = f"eval/{result.target}_normalized_score_mean"
    evals = [row for row in rows if return_key in row]
    result.metric = RETURN if evals and any(normalized_key not in row for row in evals) else NORMALIZED
    key = normalized_key if result.metric == NORMALIZED else return_key
    result.curve = [(row["step"], float(row[key])) for row in evals]
    for target in sorted(config.target_returns, reverse=True):
        target_key = key.replace(f"eval/{result.target}_", f"eval/{target}_")
        result.by_target[target] = [float(row[target_key]) for row in rows if target_key in row]
    result.losses = {k: [(row["step"], float(row[k])) for row in rows if k in row] for k in ("train_loss", "val_loss")}
    result.data_mean = data_mean_score(config, result.metric)
    last_logged = max(row["step"] for row in rows)
    if result.curve and result.curve[-1][0] >= config.update_steps:
        result.status = "finished"
    else:
        result.status = "partial"
        last_eval = f"last evaluation at step {result.curve[-1][0]}" if result.curve else "no evaluation yet"
        result.detail = f"step {last_logged} of {config.update_steps}, {last_eval}"
    return result


def find_run_folders(roots: List[Path]) -> Tuple[List[Path], List[Path]]:
    """(run folders, grid.json plans) under the roots; a run folder holds config.yaml, metrics.jsonl or grid.log."""
    folders, plans = [], []
    stack = []
    for root in roots:
        if not root.is_dir():
            raise UserError(f"{root} is not a folder; give run folders or folders that hold them")
        stack.append(root)
    while stack:
        folder = stack.pop()
        if any((folder / name).exists() for name in ("config.yaml", "metrics.jsonl", "grid.log")):
            folders.append(folder)
            continue  # its wandb/ subfolder holds wandb's own config.yaml
        if (folder / "grid.json").exists():
            plans.append(folder / "grid.json")
        stack.extend(sorted((p for p in folder.iterdir() if p.is_dir() and p.name != "wandb"), reverse=True))
    return sorted(set(folders)), plans


def planned_but_missing(plans: List[Path], folders: List[Path]) -> List[RunResult]:
    """Runs a grid was asked for (its grid.json) that have no folder at all."""
    missing = []
    for plan in plans:
        try:
            labels = json.loads(plan.read_text()).get("runs", {})
        except (json.JSONDecodeError, AttributeError, OSError):
            continue
        for label in labels:
            if plan.parent / label not in folders:
                missing.append(RunResult(plan.parent / label, "not started", f"planned in {plan}, no folder"))
    return missing


# ----------------------------------------------------------------------------------------------
# Aggregating over seeds
# ----------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Finished runs (seeds) of one dataset with one config, and the unfinished runs of that config."""
    env_name: str
    config_id: str
    metric: str
    target: float
    finished: List[RunResult] = field(default_factory=list)
    incomplete: List[RunResult] = field(default_factory=list)

    @property
    def last(self) -> List[float]:
        return [run.curve[-1][1] for run in self.finished]

    @property
    def best(self) -> List[float]:
        return [max(score for _, score in run.curve) for run in self.finished]

    @property
    def seeds(self) -> List[int]:
        return sorted(run.seed for run in self.finished)


def mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and population std (ddof=0, numpy's default and CORL's) over seeds."""
    return float(np.mean(values)), float(np.std(values))


def group_runs(runs: List[RunResult]) -> List[Group]:
    groups: Dict[Tuple[str, str, str], Group] = {}
    for run in sorted(runs, key=lambda r: r.status != "finished"):  # finished first: they fix the score kind
        if run.status not in ("finished", "partial", "no metrics"):
            continue  # no config to group by
        key = (run.env_name, run.config_id, run.metric)
        if run.status != "finished" and not run.curve:  # no evaluation yet: joins its config's group, any score kind
            key = next((k for k in groups if k[:2] == key[:2]), key)
        group = groups.setdefault(key, Group(run.env_name, run.config_id, run.metric, run.target))
        (group.finished if run.status == "finished" else group.incomplete).append(run)
    return sorted(groups.values(), key=lambda g: (FAMILIES.index(dataset_family(g.env_name)), g.env_name,
                                                  g.config_id, g.metric))


def config_differences(runs: List[RunResult]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """For each dataset run with more than one config: {dataset: {config id: {field: value}}}, differing fields only."""
    by_dataset: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for run in runs:
        if run.config_id:
            by_dataset.setdefault(run.env_name, {})[run.config_id] = run.experiment
    differences = {}
    for dataset, configs in by_dataset.items():
        if len(configs) < 2:
            continue
        names = sorted({name for fields in configs.values() for name in fields})
        differing = [n for n in names if len({json.dumps(f.get(n), sort_keys=True) for f in configs.values()}) > 1]
        differences[dataset] = {cid: {n: fields.get(n) for n in differing} for cid, fields in sorted(configs.items())}
    return differences


# ----------------------------------------------------------------------------------------------
# Writing the table, the CSV and the plots
# ----------------------------------------------------------------------------------------------
def fmt(value: Optional[float], std: Optional[float] = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ± {std:.2f}" if std is not None else f"{value:.2f}"


def table_rows(groups: List[Group]) -> List[Dict[str, Any]]:
    """One row per (dataset, config, score kind), with the published values where the score is normalized."""
    rows = []
    for group in groups:
        last, best = (mean_std(group.last), mean_std(group.best)) if group.finished else ((None, None),) * 2
        published = PUBLISHED_SCORES.get(group.env_name, (None,) * 4) if group.metric == NORMALIZED else (None,) * 4
        rows.append({
            "family": dataset_family(group.env_name), "dataset": group.env_name, "config": group.config_id,
            "score": group.metric, "target": group.target, "seeds": len(group.finished),
            "seed_list": " ".join(str(s) for s in group.seeds), "incomplete": len(group.incomplete),
            "last_mean": last[0], "last_std": last[1], "best_mean": best[0], "best_std": best[1],
            "dt_paper": published[0], "corl_last": published[1], "corl_last_std": published[2],
            "corl_best": published[3],
            "data_mean": next((run.data_mean for run in group.finished + group.incomplete), None),
        })
    return rows


def plot_name(dataset: str) -> str:
    return "curves_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset) + ".png"


def per_seed_table(groups: List[Group]) -> List[str]:
    """Each finished run's last and best score at every one of its targets (best: over its evaluations)."""
    lines = []
    for group in groups:
        targets = list(group.finished[0].by_target)
        lines += [f"Per seed, {group.env_name} config {group.config_id} ({group.metric}):", "",
                  "| seed | " + " | ".join(f"last @ {t:g} | best @ {t:g}" for t in targets) + " |",
                  "|---|" + "---|---|" * len(targets)]
        for run in sorted(group.finished, key=lambda r: r.seed):
            cells = [f"{run.by_target[t][-1]:.2f} | {max(run.by_target[t]):.2f}" if run.by_target.get(t) else "- | -"
                     for t in targets]
            lines.append(f"| {run.seed} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(groups: List[Group], rows: List[Dict[str, Any]], problems: List[RunResult],
             differences: Dict[str, Dict[str, Dict[str, Any]]],
             plots: Dict[str, str], command: str, skipped_eval_only: int) -> str:
    lines = ["# DT results", "",
             f"Made by `{command}`.", "",
             "Score at each run's highest target return: D4RL normalized score, or the raw return where the run "
             "has no reference scores (score column says which). **last**: final evaluation of each finished run; "
             "**best**: each run's best evaluation; mean ± std over seeds (population std, ddof=0, as CORL). "
             "DT paper: Chen et al. 2021; CORL: its DT baseline (last: mean ± std over 4 seeds; best: mean). "
             "Unfinished runs are not averaged in (see below).", ""]
    for family in FAMILIES:
        family_rows = [row for row in rows if row["family"] == family]
        if not family_rows:
            continue
        lines += [f"## {family}", "",
                  "| dataset | config | score | target | seeds | last | best | DT paper | CORL last | CORL best |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in family_rows:
            seeds = f"{row['seeds']} ({row['seed_list'].replace(' ', ', ')})" if row["seeds"] else "0"
            if row["incomplete"]:
                seeds += f"; {row['incomplete']} unfinished"
            lines.append(f"| {row['dataset']} | {row['config']} | {row['score']} | {row['target']:g} | {seeds} | "
                         f"{fmt(row['last_mean'], row['last_std'])} | {fmt(row['best_mean'], row['best_std'])} | "
                         f"{fmt(row['dt_paper'])} | {fmt(row['corl_last'], row['corl_last_std'])} | "
                         f"{fmt(row['corl_best'])} |")
        lines.append("")
        for dataset, data_mean in dict.fromkeys((r["dataset"], r["data_mean"]) for r in family_rows
                                                if r["data_mean"] is not None):
            lines += [f"{dataset}: the training data's own mean episode score is {data_mean:.2f} (its file's "
                      "`dataset_mean_return`).", ""]
        lines += per_seed_table([g for g in groups if dataset_family(g.env_name) == family and g.finished])
        for dataset in dict.fromkeys(row["dataset"] for row in family_rows):
            if dataset in plots:
                lines += [f"![{dataset}]({plots[dataset]})", ""]
    if differences:
        lines += ["## Configs not averaged together", ""]
        for dataset, configs in differences.items():
            described = "; ".join(f"{cid}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in fields.items())
                                  for cid, fields in configs.items())
            lines.append(f"- {dataset}: {described}")
        lines.append("")
    repeated = [(row, seed) for row in rows for seed in sorted(set(row["seed_list"].split()))
                if row["seed_list"].split().count(seed) > 1]
    if repeated:
        lines += ["## Repeated seeds", ""]
        lines += [f"- {row['dataset']} config {row['config']}: train_seed {seed} finished in "
                  f"{row['seed_list'].split().count(seed)} folders; each counts as a seed in the mean"
                  for row, seed in repeated]
        lines.append("")
    if problems:
        lines += ["## Not averaged in", "", "| run folder | dataset | seed | status | how far |",
                  "|---|---|---|---|---|"]
        for run in problems:
            seed = "-" if run.seed is None else str(run.seed)
            lines.append(f"| {run.folder} | {run.env_name or '-'} | {seed} | {run.status} | {run.detail} |")
        lines.append("")
    if skipped_eval_only:
        lines += [f"{skipped_eval_only} eval-only folder(s) (`--eval_checkpoint`) skipped.", ""]
    return "\n".join(lines)


def write_csv(rows: List[Dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["dataset"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return out.getvalue()


def plot_dataset(dataset: str, groups: List[Group], path: Path, differences: Dict[str, Dict[str, Any]]) -> None:
    """Learning curves of one dataset: per config, mean over seeds with a ±std band and each seed faint.
    differences: config id -> the fields in which the dataset's configs differ (named in the legend)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    with_val = any(run.losses.get("val_loss") for group in groups for run in group.finished)
    fig, axes = plt.subplots(1, 2 if with_val else 1, figsize=(12 if with_val else 7, 4.2), dpi=120, squeeze=False)
    ax = axes[0, 0]
    if with_val:
        plot_losses(axes[0, 1], groups)
    metric = groups[0].metric
    for index, group in enumerate(groups):
        color = f"C{index}"
        steps = sorted(set.intersection(*(set(s for s, _ in run.curve) for run in group.finished)))
        scores = np.array([[dict(run.curve)[s] for s in steps] for run in group.finished])
        for seed_scores in scores:
            ax.plot(steps, seed_scores, color=color, alpha=0.25, linewidth=0.8)
        mean, std = scores.mean(axis=0), scores.std(axis=0)
        fields = ", ".join(f"{k}={json.dumps(v)}" for k, v in differences.get(group.config_id, {}).items())
        label = (f"config {group.config_id}" + (f" ({fields[:60]})" if fields else "") +
                 f", {len(group.finished)} seed{'s' if len(group.finished) > 1 else ''}")
        ax.plot(steps, mean, color=color, linewidth=2, marker="o", markersize=3, label=label + " (mean ± std)")
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    data_mean = groups[0].finished[0].data_mean
    if data_mean is not None:
        ax.axhline(data_mean, color="tab:red", linestyle="-.", linewidth=1.2, label=f"training data mean {data_mean:.2f}")
    published = PUBLISHED_SCORES.get(dataset) if metric == NORMALIZED else None
    if published and published[0] is not None:
        ax.axhline(published[0], color="black", linestyle="--", linewidth=1.2, label=f"DT paper {published[0]:g}")
    if published and published[1] is not None:
        ax.axhline(published[1], color="gray", linestyle=":", linewidth=1.5, label=f"CORL last {published[1]:g}")
    ax.set_title(f"{dataset}: {'normalized score' if metric == NORMALIZED else 'return'} at target "
                 f"{groups[0].target:g}")
    ax.set_xlabel("update step")
    ax.set_ylabel("D4RL normalized score" if metric == NORMALIZED else "return")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(ax: Any, groups: List[Group]) -> None:
    """Each config's training loss (dashed) and held-out val_loss (solid, at evaluations), means over seeds."""
    for index, group in enumerate(groups):
        for key, style in (("train_loss", "--"), ("val_loss", "-")):
            curves = [dict(run.losses.get(key, [])) for run in group.finished]
            steps = sorted(set.intersection(*(set(curve) for curve in curves)))
            if steps:
                ax.plot(steps, [np.mean([curve[s] for curve in curves]) for s in steps], color=f"C{index}",
                        linestyle=style, marker="o" if key == "val_loss" else None, markersize=3,
                        linewidth=1.8 if key == "val_loss" else 1, label=f"config {group.config_id}: {key}")
    ax.set_title("action MSE: training batches and held-out trajectories")
    ax.set_xlabel("update step")
    ax.set_ylabel("masked action MSE (mean over seeds)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report(roots: List[Path], out_dir: Path, command: str, plots: bool = True) -> Tuple[str, List[Dict[str, Any]]]:
    """Read the run folders under roots and write results.md, results.csv and the plots to out_dir."""
    folders, plans = find_run_folders(roots)
    results = [read_run(folder) for folder in folders]
    skipped_eval_only = sum(result is None for result in results)
    runs = [result for result in results if result is not None] + planned_but_missing(plans, folders)
    if not runs:
        raise UserError(f"no run folders (config.yaml + metrics.jsonl) under {', '.join(map(str, roots))}")
    groups = group_runs(runs)
    rows = table_rows(groups)
    problems = [run for run in runs if run.status != "finished"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_files: Dict[str, str] = {}
        differences = config_differences(runs)
        if plots:
            for dataset in dict.fromkeys(g.env_name for g in groups if g.finished):
                with_seeds = [g for g in groups if g.env_name == dataset and g.finished]
                for metric in dict.fromkeys(g.metric for g in with_seeds):  # one plot per kind of score
                    name = plot_name(dataset if metric == NORMALIZED else f"{dataset}-return")
                    plot_dataset(dataset, [g for g in with_seeds if g.metric == metric], out_dir / name,
                                 differences.get(dataset, {}))
                    plot_files.setdefault(dataset, name)
        text = markdown(groups, rows, problems, differences, plot_files, command, skipped_eval_only)
        write_text(out_dir / "results.md", text)
        write_text(out_dir / "results.csv", write_csv(rows))
    except OSError as err:
        raise UserError(f"cannot write to {out_dir} ({err.strerror or err}); choose another --out") from None
    return text, rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="run folders, or folders that hold them (grid dirs, runs/)")
    parser.add_argument("--out", required=True, help="folder for results.md, results.csv and curves_*.png")
    parser.add_argument("--no_plots", action="store_true", help="tables only (no matplotlib needed)")
    args = parser.parse_args(argv)
    command = "python benchmarks/report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        text, _ = report([Path(f) for f in args.folders], Path(args.out), command, plots=not args.no_plots)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(text)
    print(f"wrote {Path(args.out) / 'results.md'}, {Path(args.out) / 'results.csv'}"
          + ("" if args.no_plots else " and the curves_*.png it links"))


if __name__ == "__main__":
    main()
