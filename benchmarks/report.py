"""Result tables, statistics and learning curves from local run folders, beside the published DT scores.

    python benchmarks/report.py runs/grid-hopper [more folders ...] --out results/hopper
    python benchmarks/report.py runs/idea --compare runs/baseline --out results/idea-vs-baseline

Reads every run folder under the given folders (config.yaml + metrics.jsonl, as algorithms/dt.py writes
them; no wandb needed) and writes to --out:
  results.md      a table per dataset family: last and best score at each run's highest target return,
                  mean +- std over seeds with a 95% bootstrap CI of the mean, seed count, the published value
                  the row is compared with; per table IQM, median, mean and optimality gap with 95% stratified
                  bootstrap CIs (rliable), and the same over all D4RL locomotion datasets
  results.csv     the dataset rows;  aggregates.csv  the per-table statistics
  curves_<dataset>.png   the learning curves of each dataset (mean and +-std over seeds, each seed faint); when
                  the runs logged them, panels with the mean episode length at the highest target and with the
                  training and held-out losses (--val_fraction)
  profile_<table>.png    performance profiles: fraction of runs with a score above tau, with 95% CI bands
The statistics need rliable (requirements-dev.txt); --no_stats leaves them out, --no_plots the figures.
With --compare B_folders: A (the folders) against B per dataset and over datasets, the difference of the mean
score (A - B) and the probability of improvement P(A > B), each with a 95% CI, printed and written to
results.md (and compare.csv); the rest of results.md is A's report.

Score: the D4RL normalized score at the run's highest target return (the number papers report); a run
logged without reference scores falls back to the return, marked so. "last" is a finished run's final
evaluation, "best" its best evaluation (chosen on the same evaluation episodes it is scored on: optimistic);
both are averaged over seeds, std over seeds is the population std (numpy's default, ddof=0, as CORL's
tables). Runs that did not finish are listed with how far they got and are not averaged in. Runs of one
dataset whose configs differ (other than seed, folders, device and speed settings) are kept apart as separate
rows, and the differing fields are listed. The bootstrap is rliable's, seeded, so a report is reproducible.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyrallis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "algorithms"))
from dt import TrainConfig, UserError, normalized_score, read_metrics  # noqa: E402

# Published DT scores, D4RL normalized, at the highest target return.
# DT paper: Chen et al. 2021, "Decision Transformer", Table 2 (D4RL): one score per dataset, mean and the
# spread it prints (its caption calls it the variance across 3 seeds); it does not say at which evaluation.
# dataset: (mean, spread)
DT_PAPER_SCORES: Dict[str, Tuple[float, float]] = {
    "halfcheetah-medium-v2": (42.6, 0.1), "halfcheetah-medium-replay-v2": (36.6, 0.8),
    "halfcheetah-medium-expert-v2": (86.8, 1.3), "hopper-medium-v2": (67.6, 1.0),
    "hopper-medium-replay-v2": (82.7, 7.0), "hopper-medium-expert-v2": (107.6, 1.8),
    "walker2d-medium-v2": (74.0, 1.4), "walker2d-medium-replay-v2": (66.6, 3.0),
    "walker2d-medium-expert-v2": (108.1, 0.2),
}
# CORL's DT: README.md of tinkoff-ai/CORL at commit 6afec90484bbf47dee05fdf525e26a3ebe028e9b (2023-08-01; the DT
# values came in 33eba94, 2023-06-14), tables "Last Scores" (final evaluation) and "Best Scores" (each run's best
# evaluation), mean +- std (ddof=0) over 4 runs, normalized score at the highest target return.
# dataset: ((last mean, last std), (best mean, best std))
CORL_SCORES: Dict[str, Tuple[Tuple[float, float], Tuple[float, float]]] = {
    "halfcheetah-medium-v2": ((42.20, 0.26), (42.73, 0.10)),
    "halfcheetah-medium-replay-v2": ((38.91, 0.50), (40.31, 0.28)),
    "halfcheetah-medium-expert-v2": ((91.55, 0.95), (93.40, 0.21)),
    "hopper-medium-v2": ((65.10, 1.61), (69.42, 3.64)),
    "hopper-medium-replay-v2": ((81.77, 6.87), (88.74, 3.02)),
    "hopper-medium-expert-v2": ((110.44, 0.33), (111.18, 0.21)),
    "walker2d-medium-v2": ((67.63, 2.54), (74.70, 0.56)),
    "walker2d-medium-replay-v2": ((59.86, 2.73), (68.22, 1.20)),
    "walker2d-medium-expert-v2": ((107.11, 0.96), (108.71, 0.34)),
    # D4RL's own data; this project's maze2d, antmaze and adroit are Minari ports (MINARI_PORT_FAMILIES)
    "maze2d-umaze-v1": ((18.08, 25.42), (63.83, 17.35)),
    "maze2d-medium-v1": ((31.71, 26.33), (68.14, 12.25)),
    "maze2d-large-v1": ((35.66, 28.20), (50.25, 19.34)),
    "antmaze-umaze-v2": ((57.00, 9.82), (64.50, 2.06)),
    "antmaze-umaze-diverse-v2": ((51.75, 0.43), (60.50, 2.29)),
    "antmaze-medium-play-v2": ((0.00, 0.00), (0.75, 0.43)),
    "antmaze-medium-diverse-v2": ((0.00, 0.00), (0.50, 0.50)),
    "antmaze-large-play-v2": ((0.00, 0.00), (0.00, 0.00)),
    "antmaze-large-diverse-v2": ((0.00, 0.00), (0.00, 0.00)),
    "pen-human-v1": ((67.68, 5.48), (77.83, 2.30)),
    "pen-cloned-v1": ((64.43, 1.43), (71.17, 2.70)),
    "pen-expert-v1": ((116.38, 1.27), (119.49, 2.31)),
    "door-human-v1": ((4.44, 0.87), (7.36, 1.24)),
    "door-cloned-v1": ((7.64, 3.26), (11.18, 0.96)),
    "door-expert-v1": ((104.87, 0.39), (105.49, 0.09)),
    "hammer-human-v1": ((1.28, 0.15), (1.68, 0.11)),
    "hammer-cloned-v1": ((1.82, 0.55), (2.74, 0.22)),
    "hammer-expert-v1": ((117.45, 6.65), (127.39, 0.10)),
    "relocate-human-v1": ((0.05, 0.01), (0.08, 0.02)),
    "relocate-cloned-v1": ((0.16, 0.09), (0.34, 0.09)),
    "relocate-expert-v1": ((104.28, 0.42), (106.49, 0.30)),
}
# this project reads these families from Minari ports (regenerated data: other observations, antmaze's include
# the goal, other success radii), so scores published on D4RL's data are no target for them
MINARI_PORT_FAMILIES = ("antmaze", "maze2d", "adroit")
NOT_COMPARABLE = "D4RL data, not comparable"
D4RL_LOCOMOTION = re.compile(r"^(halfcheetah|hopper|walker2d)-[a-z-]+-v2$")
# statistics: rliable's percentile bootstrap, stratified over datasets; the seed makes two reports identical.
# 1000 reps keep a 36-run report at a few seconds (benchmarks/report_speed.py; docs/reproducing.md)
BOOTSTRAP_REPS = 1000
BOOTSTRAP_SEED = 0
CI_NEEDS = "CI needs >= 2 runs"
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
    episode_length: List[Tuple[int, float]] = field(default_factory=list)  # (step, mean episode length at target)
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
    if fields.get("attention_init"):  # a run of older dt.py: its init under the field's new name, as dt.py reads it
        fields["init"] = {"xavier": "corl", "normal": "normal"}.get(fields["attention_init"], fields["attention_init"])
    fields.pop("attention_init", None)
    if fields.get("dataset_path"):  # the file, not where a machine keeps it
        fields["dataset_path"] = Path(fields["dataset_path"]).name
    return fields


def recipe(fields: Dict[str, Any]) -> str:
    """The run's init recipe: kzl (the DT authors'), normal or corl (older runs' attention_init read as dt.py reads it)."""
    return fields.get("init") or "corl"


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
    length_key = f"eval/{result.target}_episode_length_mean"  # logged by newer dt.py; older runs have no such key
    result.episode_length = [(row["step"], float(row[length_key])) for row in rows if length_key in row]
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
    def runs(self) -> List[RunResult]:
        """The finished runs in seed order (a repeated seed: by folder)."""
        return sorted(self.finished, key=lambda run: (run.seed, str(run.folder)))

    @property
    def last(self) -> List[float]:
        return [run.curve[-1][1] for run in self.runs]

    @property
    def best(self) -> List[float]:
        return [max(score for _, score in run.curve) for run in self.runs]

    @property
    def seeds(self) -> List[int]:
        return [run.seed for run in self.runs]

    @property
    def experiment(self) -> Dict[str, Any]:
        return (self.finished + self.incomplete)[0].experiment


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


def differing_fields(configs: Sequence[Dict[str, Any]]) -> List[str]:
    """The fields whose values are not the same in all the given experiment fields."""
    names = sorted({name for fields in configs for name in fields})
    return [n for n in names if len({json.dumps(fields.get(n), sort_keys=True) for fields in configs}) > 1]


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
        differing = differing_fields(list(configs.values()))
        differences[dataset] = {cid: {n: fields.get(n) for n in differing} for cid, fields in sorted(configs.items())}
    return differences


def split_by_config(groups: List[Group]) -> Dict[str, List[Group]]:
    """Groups (at most one config per dataset each) split where a dataset was run with several configs: keyed by
    the values of the fields in which some dataset's configs differ, or "all runs" when no dataset has two."""
    by_dataset: Dict[str, List[Group]] = {}
    for group in groups:
        by_dataset.setdefault(group.env_name, []).append(group)
    varying = sorted({name for members in by_dataset.values()
                      for name in differing_fields([g.experiment for g in members])})
    split: Dict[str, List[Group]] = {}
    for group in groups:
        label = ", ".join(f"{n}={json.dumps(group.experiment.get(n))}" for n in varying) or "all runs"
        split.setdefault(label, []).append(group)
    return dict(sorted(split.items()))


# ----------------------------------------------------------------------------------------------
# Statistics (rliable, imported only when a report computes them)
# ----------------------------------------------------------------------------------------------
Interval = Optional[Tuple[float, float]]  # a 95% CI; None with fewer than 2 runs
AGGREGATES = ("IQM", "median", "mean", "optimality gap")


def rliable_modules() -> Tuple[Any, Any]:
    """rliable's library and metrics modules, or a UserError saying what to install."""
    try:
        from rliable import library, metrics
    except Exception as err:  # ImportError, or arch failing to import with another pandas than the pinned one
        raise UserError(f"the report's statistics need rliable, which cannot be imported ({type(err).__name__}: "
                        f"{err}): pip install -r requirements-dev.txt (rliable 1.2.0 with arch 7.2.0 and pandas "
                        "2.3.3), or give --no_stats for the tables without them") from None
    return library, metrics


@contextlib.contextmanager
def bootstrap_seed() -> Iterator[None]:
    """rliable 1.2.0 draws its resampling indices from numpy's global RNG (np.random.choice): seed it for one
    bootstrap, so two reports of the same runs are identical, and give the caller's RNG state back afterwards."""
    state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)
    try:
        yield
    finally:
        np.random.set_state(state)


def interval_estimates(scores: Union[np.ndarray, List[np.ndarray]],
                       func: Callable[..., np.ndarray]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """func's values on scores (a runs x datasets matrix, or a list of two for A and B) and their 95% CIs: rliable's
    stratified bootstrap (get_interval_estimates: runs resampled with replacement within each dataset, each matrix
    on its own; percentile intervals), seeded. The CIs (2 x values) are None when a matrix has fewer than 2 runs."""
    library, _ = rliable_modules()
    matrices = scores if isinstance(scores, list) else [scores]
    if min(matrix.shape[0] for matrix in matrices) < 2:
        return np.asarray(func(*matrices), dtype=float), None
    with bootstrap_seed():
        points, intervals = library.get_interval_estimates({"x": scores}, func, reps=BOOTSTRAP_REPS)
    return np.asarray(points["x"], dtype=float), np.asarray(intervals["x"], dtype=float)


def interval(cis: Optional[np.ndarray], index: int = 0) -> Interval:
    return None if cis is None else (float(cis[0, index]), float(cis[1, index]))


def ci_columns(prefix: str, ci: Interval) -> Dict[str, Optional[float]]:
    """A CI as two CSV columns, <prefix>ci_low and <prefix>ci_high (empty without a CI)."""
    return {f"{prefix}ci_low": None if ci is None else ci[0], f"{prefix}ci_high": None if ci is None else ci[1]}


def row_ci(row: Dict[str, Any], prefix: str = "") -> Interval:
    """The CI that ci_columns put in a row."""
    return None if row[f"{prefix}ci_low"] is None else (row[f"{prefix}ci_low"], row[f"{prefix}ci_high"])


def mean_ci(values: List[float]) -> Interval:
    """95% bootstrap CI of the mean over seeds of one dataset."""
    _, metrics = rliable_modules()
    _, cis = interval_estimates(np.array(values, dtype=float)[:, None], lambda x: np.array([metrics.aggregate_mean(x)]))
    return interval(cis)


def score_matrix(groups: List[Group], which: str) -> Tuple[np.ndarray, List[str]]:
    """The runs x datasets matrix of last or best scores that rliable takes, one group per dataset: as many runs
    per dataset as the dataset with the fewest has (the lowest seeds), and a note for each dataset cut short."""
    runs = min(len(group.finished) for group in groups)
    matrix = np.array([getattr(group, which)[:runs] for group in groups], dtype=float).T
    notes = [f"{g.env_name} (config {g.config_id}): {len(g.finished) - runs} of its {len(g.finished)} runs left out "
             "(the highest seeds)" for g in groups if len(g.finished) > runs]
    return matrix, notes


def aggregates(table: str, groups: List[Group]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """IQM, median, mean and optimality gap (mean of max(100 - score, 0)) of a table's finished runs with
    normalized scores, with 95% stratified bootstrap CIs, for last and best, per config (split_by_config);
    and the notes of score_matrix."""
    _, metrics = rliable_modules()

    def statistics(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_median(x), metrics.aggregate_mean(x),
                         metrics.aggregate_optimality_gap(x, 100.0)])

    rows, notes = [], []
    for label, members in split_by_config([g for g in groups if g.finished and g.metric == NORMALIZED]).items():
        for which in ("last", "best"):
            matrix, cut = score_matrix(members, which)
            notes += cut if which == "last" else []
            points, cis = interval_estimates(matrix, statistics)
            for index, name in enumerate(AGGREGATES):
                rows.append({"table": table, "config": label, "datasets": matrix.shape[1],
                             "runs_per_dataset": matrix.shape[0], "score": which, "statistic": name,
                             "estimate": float(points[index]), **ci_columns("", interval(cis, index))})
    return rows, notes


def fraction_above(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """rliable's score distribution (run_score_deviation) at every tau at once: the fraction of scores above tau."""
    return np.mean(scores.reshape(-1, 1) > np.asarray(taus).reshape(1, -1), axis=0)


# ----------------------------------------------------------------------------------------------
# Published values and the A/B comparison
# ----------------------------------------------------------------------------------------------
def reference(dataset: str, metric: str, init: str) -> Dict[str, Any]:
    """What a row is compared with: the DT paper for runs with the DT authors' recipe (init kzl), CORL's last and
    best for the others; nothing for a Minari port, whose values on D4RL's data are only quoted as not comparable."""
    ref: Dict[str, Any] = {"reference": "", "ref_last": None, "ref_last_std": None, "ref_best": None,
                           "ref_best_std": None, "not_comparable": ""}
    if metric != NORMALIZED:
        return ref
    if dataset_family(dataset) in MINARI_PORT_FAMILIES:
        ref["reference"] = "none: Minari port"
        if dataset in CORL_SCORES:
            (last, last_std), (best, best_std) = CORL_SCORES[dataset]
            ref["not_comparable"] = (f"{NOT_COMPARABLE}: CORL's DT on D4RL's {dataset}: last {last:.2f} ± "
                                     f"{last_std:.2f}, best {best:.2f} ± {best_std:.2f}")
    elif init == "kzl" and dataset in DT_PAPER_SCORES:
        ref.update(reference="DT paper", ref_last=DT_PAPER_SCORES[dataset][0], ref_last_std=DT_PAPER_SCORES[dataset][1])
    elif init != "kzl" and dataset in CORL_SCORES:
        (last, last_std), (best, best_std) = CORL_SCORES[dataset]
        ref.update(reference="CORL", ref_last=last, ref_last_std=last_std, ref_best=best, ref_best_std=best_std)
    return ref


def one_config_per_dataset(side: str, runs: List[RunResult]) -> Dict[str, Group]:
    """The finished runs of one side of --compare by dataset; refuses a side with two configs of one dataset."""
    by_dataset: Dict[str, List[Group]] = {}
    for group in group_runs(runs):
        if group.finished:
            by_dataset.setdefault(group.env_name, []).append(group)
    if not by_dataset:
        raise UserError(f"{side} has no finished run to compare")
    for dataset, groups in by_dataset.items():
        if len(groups) > 1:
            configs = ", ".join(f"{g.config_id} ({g.metric})" for g in groups)
            raise UserError(f"{side} holds {len(groups)} configs of {dataset} ({configs}); --compare takes one config "
                            "per dataset on each side: give the folders of one (a report without --compare lists "
                            "how they differ)")
    return {dataset: groups[0] for dataset, groups in by_dataset.items()}


def check_comparable(a: Dict[str, Group], b: Dict[str, Group]) -> None:
    """A and B must hold the same datasets, trained for the same update_steps, scored the same way."""
    problems = []
    for side, mine, other in (("A", a, b), ("B", b, a)):
        if set(mine) - set(other):
            problems.append(f"datasets only in {side}: {', '.join(sorted(set(mine) - set(other)))}")
    both = sorted(set(a) & set(b))
    steps = [f"{d} (A {a[d].experiment['update_steps']}, B {b[d].experiment['update_steps']})" for d in both
             if a[d].experiment["update_steps"] != b[d].experiment["update_steps"]]
    if steps:
        problems.append(f"update_steps differ: {', '.join(steps)}")
    kinds = [f"{d} (A {a[d].metric}, B {b[d].metric})" for d in both if a[d].metric != b[d].metric]
    if kinds:
        problems.append(f"score kinds differ: {', '.join(kinds)}")
    if problems:
        raise UserError("A and B are not the same datasets with the same update_steps: " + "; ".join(problems))


def comparison(a: Dict[str, Group], b: Dict[str, Group]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Per dataset and over the normalized-score datasets, last and best: A - B in mean score and P(A > B)
    (rliable's probability_of_improvement), each with its 95% CI, A's and B's runs resampled independently."""
    _, metrics = rliable_modules()

    def difference_and_improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_mean(x) - metrics.aggregate_mean(y),
                         metrics.probability_of_improvement(x, y)])

    datasets = sorted(a, key=lambda d: (FAMILIES.index(dataset_family(d)), d))
    normalized = [d for d in datasets if a[d].metric == NORMALIZED]
    rows, notes = [], []
    for which in ("last", "best"):
        pairs = [(d, a[d].metric, np.array(getattr(a[d], which))[:, None], np.array(getattr(b[d], which))[:, None])
                 for d in datasets]
        if len(normalized) > 1:
            x, cut_a = score_matrix([a[d] for d in normalized], which)
            y, cut_b = score_matrix([b[d] for d in normalized], which)
            notes += [f"A: {n}" for n in cut_a] + [f"B: {n}" for n in cut_b] if which == "last" else []
            pairs.append((f"all {len(normalized)} datasets", NORMALIZED, x, y))
        for name, metric, x, y in pairs:
            points, cis = interval_estimates([x, y], difference_and_improvement)
            rows.append({"score": which, "dataset": name, "metric": metric, "runs_a": x.shape[0],
                         "runs_b": y.shape[0], "a_mean": float(x.mean()), "b_mean": float(y.mean()),
                         "difference": float(points[0]), **ci_columns("difference_", interval(cis, 0)),
                         "p_improvement": float(points[1]), **ci_columns("p_improvement_", interval(cis, 1))})
    return rows, notes


# ----------------------------------------------------------------------------------------------
# Writing the table, the CSV and the plots
# ----------------------------------------------------------------------------------------------
def fmt(value: Optional[float], std: Optional[float] = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ± {std:.2f}" if std is not None else f"{value:.2f}"


def fmt_ci(ci: Interval) -> str:
    return f"[{CI_NEEDS}]" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def table_rows(groups: List[Group], stats: bool) -> List[Dict[str, Any]]:
    """One row per (dataset, config, score kind): mean ± std and (stats) the 95% CI of the mean of last and best,
    and the published values the row is compared with."""
    rows = []
    for group in groups:
        row = {"family": dataset_family(group.env_name), "dataset": group.env_name, "config": group.config_id,
               "init": recipe(group.experiment), "score": group.metric, "target": group.target,
               "seeds": len(group.finished), "seed_list": " ".join(str(s) for s in group.seeds),
               "incomplete": len(group.incomplete)}
        for which in ("last", "best"):
            values = getattr(group, which)
            mean, std = mean_std(values) if values else (None, None)
            row.update({f"{which}_mean": mean, f"{which}_std": std,
                        **ci_columns(f"{which}_", mean_ci(values) if stats and values else None)})
        row.update(reference(group.env_name, group.metric, row["init"]))
        row["data_mean"] = next((run.data_mean for run in group.finished + group.incomplete), None)
        rows.append(row)
    return rows


def plot_name(dataset: str, prefix: str = "curves_") -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset) + ".png"


def per_seed_table(groups: List[Group]) -> List[str]:
    """Each finished run's last and best score at every one of its targets (best: over its evaluations)."""
    lines = []
    for group in groups:
        targets = list(group.finished[0].by_target)
        lines += [f"Per seed, {group.env_name} config {group.config_id} ({group.metric}):", "",
                  "| seed | " + " | ".join(f"last @ {t:g} | best † @ {t:g}" for t in targets) + " |",
                  "|---|" + "---|---|" * len(targets)]
        for run in group.runs:
            cells = [f"{run.by_target[t][-1]:.2f} | {max(run.by_target[t]):.2f}" if run.by_target.get(t) else "- | -"
                     for t in targets]
            lines.append(f"| {run.seed} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


CUT_NOTE = "A runs x datasets matrix takes the same number of runs from each dataset: "
BEST_NOTE = ("† best: each run's highest evaluation. Every evaluation of a run plays the same episodes (the same "
             "reset seeds, unless eval_reset is unseeded), so best picks the checkpoint on the episodes it is scored "
             "on: it selects on the test set and is optimistic; last is the honest number. CORL's best is chosen the "
             "same way.")
REFERENCE_NOTE = ("‡ Compared with, by recipe: runs with `init: kzl` (the DT authors' recipe) with the DT paper "
                  "(Chen et al. 2021, Table 2: one score per dataset, its ± as printed, 3 seeds; not said at which "
                  "evaluation, shown under last); the other runs with CORL's DT (its README at commit 6afec90: "
                  "last and best, mean ± std over 4 runs).")


def score_cell(row: Dict[str, Any], which: str, stats: bool) -> str:
    if row[f"{which}_mean"] is None:
        return "-"
    cell = fmt(row[f"{which}_mean"], row[f"{which}_std"])
    return cell + (" " + fmt_ci(row_ci(row, f"{which}_")) if stats else "")


def family_table(rows: List[Dict[str, Any]], stats: bool) -> List[str]:
    ci = " [95% CI]" if stats else ""
    lines = [f"| dataset | config | init | score | target | seeds | last: mean ± std{ci} | "
             f"best †: mean ± std{ci} | compared with ‡ | its last | its best † |", "|---" * 11 + "|"]
    for row in rows:
        seeds = f"{row['seeds']} ({row['seed_list'].replace(' ', ', ')})" if row["seeds"] else "0"
        if row["incomplete"]:
            seeds += f"; {row['incomplete']} unfinished"
        lines.append(f"| {row['dataset']} | {row['config']} | {row['init']} | {row['score']} | {row['target']:g} | "
                     f"{seeds} | {score_cell(row, 'last', stats)} | {score_cell(row, 'best', stats)} | "
                     f"{row['reference'] or '-'} | {fmt(row['ref_last'], row['ref_last_std'])} | "
                     f"{fmt(row['ref_best'], row['ref_best_std'])} |")
    lines += ["", BEST_NOTE]
    if any(row["reference"] in ("DT paper", "CORL") for row in rows):
        lines.append(REFERENCE_NOTE)
    if any(row["reference"].startswith("none: Minari port") for row in rows):
        lines.append("This project's antmaze, maze2d and adroit data are Minari ports (regenerated: other "
                     "observations, antmaze's include the goal, other success radii): the values published on "
                     "D4RL's data are no target for them and are quoted only for orientation:")
        lines += [f"- {row['not_comparable']}" for row in rows if row["not_comparable"]]
    return lines + [""]


def aggregates_table(rows: List[Dict[str, Any]], notes: List[str], profile: Optional[str]) -> List[str]:
    if not rows:
        return []
    lines = ["Aggregates of the normalized scores (rliable: IQM over all runs, median and mean of the per-dataset "
             "means, optimality gap = mean of max(100 - score, 0); 95% stratified bootstrap CIs, "
             f"{BOOTSTRAP_REPS} reps, seed {BOOTSTRAP_SEED}):", "",
             "| config | datasets | runs per dataset | score | " + " | ".join(AGGREGATES) + " |",
             "|---|---|---|---|" + "---|" * len(AGGREGATES)]
    for start in range(0, len(rows), len(AGGREGATES)):
        first, cells = rows[start], rows[start:start + len(AGGREGATES)]
        lines.append(f"| {first['config']} | {first['datasets']} | {first['runs_per_dataset']} | "
                     f"{'best †' if first['score'] == 'best' else 'last'} | "
                     + " | ".join(f"{fmt(r['estimate'])} {fmt_ci(row_ci(r))}" for r in cells) + " |")
    lines.append("")
    if notes:
        lines += [CUT_NOTE + "; ".join(notes) + ".", ""]
    if profile:
        lines += [f"![performance profile]({profile})", ""]
    return lines


def comparison_markdown(rows: List[Dict[str, Any]], notes: List[str], a: Dict[str, Group], b: Dict[str, Group],
                        a_roots: List[Path], b_roots: List[Path]) -> List[str]:
    pairs: Dict[str, set] = {}
    for dataset in a:
        for name in differing_fields([a[dataset].experiment, b[dataset].experiment]):
            pairs.setdefault(name, set()).add((json.dumps(a[dataset].experiment.get(name)),
                                               json.dumps(b[dataset].experiment.get(name))))
    differ = "; ".join(f"{n}: A {next(iter(v))[0]}, B {next(iter(v))[1]}" if len(v) == 1 else f"{n}: per dataset"
                       for n, v in sorted(pairs.items())) or "none (the same configs)"
    steps = sorted({g.experiment["update_steps"] for g in a.values()})
    lines = ["## A/B comparison", "",
             f"A: {', '.join(map(str, a_roots))}; B: {', '.join(map(str, b_roots))}; {len(a)} datasets, "
             f"update_steps {', '.join(map(str, steps))}. Fields in which A's configs differ from B's: {differ}.", "",
             "A - B: difference of the mean score; P(A > B): probability that a run of A scores higher than a run of "
             "B, ties counting half (rliable's probability_of_improvement: Mann-Whitney U / (n_A n_B), averaged over "
             "datasets). 95% bootstrap CIs: A's and B's runs resampled independently within each dataset (runs are "
             f"not paired by seed), {BOOTSTRAP_REPS} reps, seed {BOOTSTRAP_SEED}. \"all ... datasets\": the "
             "normalized-score datasets together.", ""]
    for which in ("last", "best"):
        lines += [f"### {'best †' if which == 'best' else 'last'}", "",
                  "| dataset | score | runs A | runs B | A mean | B mean | A - B [95% CI] | P(A > B) [95% CI] |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["score"] == which):
            lines.append(f"| {row['dataset']} | {row['metric']} | {row['runs_a']} | {row['runs_b']} | "
                         f"{fmt(row['a_mean'])} | {fmt(row['b_mean'])} | "
                         f"{fmt(row['difference'])} {fmt_ci(row_ci(row, 'difference_'))} | "
                         f"{fmt(row['p_improvement'])} {fmt_ci(row_ci(row, 'p_improvement_'))} |")
        lines.append("")
    lines.append(BEST_NOTE)
    if notes:
        lines.append(CUT_NOTE + "; ".join(notes) + ".")
    return lines + [""]


def markdown(groups: List[Group], rows: List[Dict[str, Any]], problems: List[RunResult],
             differences: Dict[str, Dict[str, Dict[str, Any]]], plots: Dict[str, str], command: str,
             skipped_eval_only: int, tables: Dict[str, Tuple[List[Dict[str, Any]], List[str], Optional[str]]],
             compared: List[str], stats: bool) -> str:
    lines = ["# DT results", "",
             f"Made by `{command}`.", "",
             "Score at each run's highest target return: D4RL normalized score, or the raw return where the run "
             "has no reference scores (score column says which). **last**: final evaluation of each finished run; "
             "**best**: each run's best evaluation (selected on the evaluation episodes, see †); mean ± std over "
             "seeds (population std, ddof=0, as CORL)"
             + (f", and the 95% bootstrap CI of the mean (rliable, {BOOTSTRAP_REPS} reps, seed {BOOTSTRAP_SEED}; "
                f"\"{CI_NEEDS}\" with one seed)" if stats else "; statistics off (--no_stats)")
             + ". Unfinished runs are not averaged in (see below).", ""]
    lines += compared
    if "d4rl-locomotion" in tables:
        lines += ["## D4RL locomotion", "",
                  "All halfcheetah, hopper and walker2d -v2 datasets of the tables below.", ""]
        lines += aggregates_table(*tables["d4rl-locomotion"])
    for family in FAMILIES:
        family_rows = [row for row in rows if row["family"] == family]
        if not family_rows:
            continue
        lines += [f"## {family}", ""] + family_table(family_rows, stats)
        for dataset, data_mean in dict.fromkeys((r["dataset"], r["data_mean"]) for r in family_rows
                                                if r["data_mean"] is not None):
            lines += [f"{dataset}: the training data's own mean episode score is {data_mean:.2f} (its file's "
                      "`dataset_mean_return`).", ""]
        if family in tables:
            lines += aggregates_table(*tables[family])
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


def write_csv(rows: List[Dict[str, Any]], first: str = "dataset") -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [first], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return out.getvalue()


def plot_dataset(dataset: str, groups: List[Group], path: Path, differences: Dict[str, Dict[str, Any]]) -> None:
    """Learning curves of one dataset: per config, mean over seeds with a ±std band and each seed faint, and the
    published value each config is compared with; beside them, when the runs logged them, the mean episode length
    at the highest target and the losses. differences: config id -> the fields in which the dataset's configs
    differ (named in the legend)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    with_length = any(run.episode_length for group in groups for run in group.finished)
    with_val = any(run.losses.get("val_loss") for group in groups for run in group.finished)
    panels = 1 + with_length + with_val
    fig, axes = plt.subplots(1, panels, figsize=(7 if panels == 1 else 6 * panels, 4.2), dpi=120, squeeze=False)
    ax = axes[0, 0]
    if with_length:
        plot_mean_curves(axes[0, 1], groups, lambda run: run.episode_length, differences)
        axes[0, 1].set_title(f"mean episode length at target {groups[0].target:g}")
        axes[0, 1].set_ylabel("steps per episode (mean over seeds)")
    if with_val:
        plot_losses(axes[0, panels - 1], groups)
    metric = groups[0].metric
    plot_mean_curves(ax, groups, lambda run: run.curve, differences, faint_seeds=True)
    data_mean = groups[0].finished[0].data_mean
    if data_mean is not None:
        ax.axhline(data_mean, color="tab:red", linestyle="-.", linewidth=1.2, label=f"training data mean {data_mean:.2f}")
    for source in sorted({reference(dataset, metric, recipe(g.experiment))["reference"] for g in groups}):
        ref = reference(dataset, metric, "kzl" if source == "DT paper" else "corl")  # none for a Minari port
        if source == "DT paper":
            ax.axhline(ref["ref_last"], color="black", linestyle="--", linewidth=1.2,
                       label=f"DT paper {ref['ref_last']:g} (reference of init kzl)")
        elif source == "CORL":
            ax.axhline(ref["ref_last"], color="gray", linestyle=":", linewidth=1.5,
                       label=f"CORL last {ref['ref_last']:g}")
    ax.set_title(f"{dataset}: {'normalized score' if metric == NORMALIZED else 'return'} at target "
                 f"{groups[0].target:g}")
    ax.set_ylabel("D4RL normalized score" if metric == NORMALIZED else "return")
    save_figure(fig, path)


def plot_mean_curves(ax: Any, groups: List[Group], curve: Callable[[RunResult], List[Tuple[int, float]]],
                     differences: Dict[str, Dict[str, Any]], faint_seeds: bool = False) -> None:
    """Per config, the mean over seeds of a per-evaluation curve with a ±std band (and each seed faint), at the
    steps every seed logged."""
    for index, group in enumerate(groups):
        color = f"C{index}"
        curves = [dict(curve(run)) for run in group.finished]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        values = np.array([[c[s] for s in steps] for c in curves])
        for seed_values in values if faint_seeds else ():
            ax.plot(steps, seed_values, color=color, alpha=0.25, linewidth=0.8)
        mean, std = values.mean(axis=0), values.std(axis=0)
        fields = ", ".join(f"{k}={json.dumps(v)}" for k, v in differences.get(group.config_id, {}).items())
        label = (f"config {group.config_id}" + (f" ({fields})" if fields else "") +
                 f", {len(curves)} seed{'s' if len(curves) > 1 else ''}")
        ax.plot(steps, mean, color=color, linewidth=2, marker="o", markersize=3, label=label + " (mean ± std)")
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("update step")
    ax.grid(alpha=0.3)


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


def plot_profiles(title: str, groups: List[Group], path: Path) -> None:
    """Performance profiles of a table's normalized scores (rliable's create_performance_profile and
    plot_performance_profiles): per config, the fraction of runs with a score above tau, with 95% stratified
    bootstrap CI bands where every dataset has at least 2 runs; last and best side by side. No published
    value is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    library, _ = rliable_modules()
    from rliable import plot_utils

    by_config = split_by_config([g for g in groups if g.finished and g.metric == NORMALIZED])
    matrices = {which: {label: score_matrix(members, which)[0] for label, members in by_config.items()}
                for which in ("last", "best")}
    scores = np.concatenate([m.ravel() for by_label in matrices.values() for m in by_label.values()])
    taus = np.linspace(min(0.0, np.floor(scores.min())), max(100.0, np.ceil(scores.max())), 101)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for ax, which in zip(axes, ("last", "best")):
        names = {label: f"{label} ({m.shape[1]} datasets x {m.shape[0]} runs"
                        + (", 95% CI)" if m.shape[0] >= 2 else f"; {CI_NEEDS})")
                 for label, m in matrices[which].items()}
        with_ci = {names[label]: m for label, m in matrices[which].items() if m.shape[0] >= 2}
        with bootstrap_seed():
            _, cis = library.create_performance_profile(with_ci, taus, custom_profile_func=fraction_above,
                                                        reps=BOOTSTRAP_REPS) if with_ci else ({}, {})
        profiles = {names[label]: fraction_above(m, taus) for label, m in matrices[which].items()}
        plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=cis, ax=ax,
                                             colors={name: f"C{index}" for index, name in enumerate(profiles)},
                                             xlabel="normalized score τ", ylabel="fraction of runs with score > τ",
                                             labelsize="medium", ticklabelsize="small")
        ax.set_title(f"{title}: {'best (selected on the evaluation episodes)' if which == 'best' else 'last'}",
                     fontsize="medium")
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Lay the panels out, put each one's legend under it (wrapped: config labels list fields), write atomically."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    for ax in fig.axes:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, [textwrap.fill(label, 70) for label in labels], fontsize=7, loc="upper center",
                      bbox_to_anchor=(0.5, -0.14))
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")  # the canvas grows to hold the legends
    plt.close(fig)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_runs(roots: List[Path]) -> Tuple[List[RunResult], int]:
    """Every run under roots (and the runs their grid.json planned that have no folder); eval-only folders counted."""
    folders, plans = find_run_folders(roots)
    results = [read_run(folder) for folder in folders]
    runs = [result for result in results if result is not None] + planned_but_missing(plans, folders)
    if not runs:
        raise UserError(f"no run folders (config.yaml + metrics.jsonl) under {', '.join(map(str, roots))}")
    return runs, sum(result is None for result in results)


def statistics_tables(groups: List[Group]) -> Dict[str, Tuple[List[Dict[str, Any]], List[str], List[Group]]]:
    """Per family table, and for all D4RL locomotion datasets when they span several families: its aggregates,
    their notes, and its groups with normalized scores."""
    tables = {}
    locomotion = [g for g in groups if g.finished and g.metric == NORMALIZED and D4RL_LOCOMOTION.match(g.env_name)]
    candidates = [(family, [g for g in groups if dataset_family(g.env_name) == family]) for family in FAMILIES]
    if len({dataset_family(g.env_name) for g in locomotion}) > 1:
        candidates.insert(0, ("d4rl-locomotion", locomotion))
    for name, members in candidates:
        members = [g for g in members if g.finished and g.metric == NORMALIZED]
        if members:
            rows, notes = aggregates(name, members)
            tables[name] = (rows, notes, members)
    return tables


def report(roots: List[Path], out_dir: Path, command: str, plots: bool = True, stats: bool = True,
           compare: Optional[List[Path]] = None) -> Tuple[str, List[Dict[str, Any]]]:
    """Read the run folders under roots and write results.md, results.csv, aggregates.csv and the plots to out_dir;
    with compare (B's folders), the A/B comparison too (results.md and compare.csv)."""
    runs, skipped_eval_only = read_runs(roots)
    compared, compare_rows = [], []
    if compare is not None:
        a = one_config_per_dataset("A", runs)
        b = one_config_per_dataset("B", read_runs(compare)[0])
        check_comparable(a, b)
        compare_rows, notes = comparison(a, b)
        compared = comparison_markdown(compare_rows, notes, a, b, roots, compare)
    groups = group_runs(runs)
    rows = table_rows(groups, stats)
    tables = statistics_tables(groups) if stats else {}
    problems = [run for run in runs if run.status != "finished"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_files: Dict[str, str] = {}
        profiles: Dict[str, Optional[str]] = {name: None for name in tables}
        differences = config_differences(runs)
        if plots:
            for dataset in dict.fromkeys(g.env_name for g in groups if g.finished):
                with_seeds = [g for g in groups if g.env_name == dataset and g.finished]
                for metric in dict.fromkeys(g.metric for g in with_seeds):  # one plot per kind of score
                    name = plot_name(dataset if metric == NORMALIZED else f"{dataset}-return")
                    plot_dataset(dataset, [g for g in with_seeds if g.metric == metric], out_dir / name,
                                 differences.get(dataset, {}))
                    plot_files.setdefault(dataset, name)
            for table, (_, _, members) in tables.items():
                profiles[table] = plot_name(table, "profile_")
                plot_profiles("D4RL locomotion" if table == "d4rl-locomotion" else table, members,
                              out_dir / profiles[table])
            if compare is not None and stats:  # A's and B's profiles in one figure, one curve per side's config
                plot_profiles("A and B", list(a.values()) + list(b.values()), out_dir / "profile_compare.png")
                compared[-1:-1] = ["", "![A and B: performance profiles](profile_compare.png)"]
        text = markdown(groups, rows, problems, differences, plot_files, command, skipped_eval_only,
                        {name: (t[0], t[1], profiles[name]) for name, t in tables.items()}, compared, stats)
        write_text(out_dir / "results.md", text)
        write_text(out_dir / "results.csv", write_csv(rows))
        if stats:
            write_text(out_dir / "aggregates.csv", write_csv([r for t in tables.values() for r in t[0]], "table"))
        if compare is not None:
            write_text(out_dir / "compare.csv", write_csv(compare_rows, "dataset"))
    except OSError as err:
        raise UserError(f"cannot write to {out_dir} ({err.strerror or err}); choose another --out") from None
    return text, rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="run folders, or folders that hold them (grid dirs, runs/)")
    parser.add_argument("--out", required=True, help="folder for results.md, results.csv, aggregates.csv and plots")
    parser.add_argument("--compare", nargs="+", metavar="B_FOLDER",
                        help="compare the folders (A) with these (B): same datasets, same update_steps, one config "
                             "per dataset on each side")
    parser.add_argument("--no_plots", action="store_true", help="tables only (no matplotlib needed)")
    parser.add_argument("--no_stats", action="store_true",
                        help="no CIs, aggregates or profiles (no rliable needed); not with --compare")
    args = parser.parse_args(argv)
    command = "python benchmarks/report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        if args.compare and args.no_stats:
            raise UserError("--compare is statistics (rliable); drop --no_stats")
        text, _ = report([Path(f) for f in args.folders], Path(args.out), command, plots=not args.no_plots,
                         stats=not args.no_stats, compare=[Path(f) for f in args.compare] if args.compare else None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(text)
    written = ["results.md", "results.csv"] + ([] if args.no_stats else ["aggregates.csv"]) + \
        (["compare.csv"] if args.compare else [])
    print(f"wrote {', '.join(str(Path(args.out) / name) for name in written)}"
          + ("" if args.no_plots else " and the curves_*.png and profile_*.png it links"))


if __name__ == "__main__":
    main()
