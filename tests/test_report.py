"""benchmarks/report.py on hand-written run folders: last/best over seeds, unfinished runs, targets, published values
by recipe, the rliable statistics (checked against values and a bootstrap computed here) and --compare."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402


def write_run(folder: Path, env_name: str = "hopper-medium-v2", seed: int = 0, targets=(3600, 1800),
              update_steps: int = 300, scores=None, normalized: bool = True, extra_config: str = "",
              logged_until: int = None, episode_length=None) -> Path:
    """A run folder as dt.py leaves it: config.yaml, and metrics.jsonl with train rows and eval rows.

    scores: {step: {target: normalized score mean}}; the return is 10x the score so both are checkable.
    episode_length: f(step, target) -> the logged mean episode length (newer dt.py), or None (older runs).
    """
    folder.mkdir(parents=True)
    folder.joinpath("config.yaml").write_text(
        f"env_name: {env_name}\ntrain_seed: {seed}\nupdate_steps: {update_steps}\neval_every: 100\n"
        f"target_returns: [{', '.join(str(t) for t in targets)}]\nrun_dir: {folder}\n{extra_config}")
    rows = []
    last_step = max(scores) if scores else 0
    for step in range(50, (logged_until or last_step) + 1, 50):
        rows.append({"step": step, "train_loss": 0.1, "learning_rate": 1e-4})
        for target, score in (scores or {}).get(step, {}).items():
            key = f"eval/{float(target)}"
            row = {"step": step, f"{key}_return_mean": 10 * score, f"{key}_return_std": 1.0}
            if normalized:
                row.update({f"{key}_normalized_score_mean": score, f"{key}_normalized_score_std": 0.5})
            if episode_length is not None:
                row.update({f"{key}_episode_length_mean": episode_length(step, target),
                            f"{key}_terminated_fraction": 0.5})
            rows.append(row)
    if scores is not None:
        folder.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def curve(*values, target=3600, low=0.0):
    """Eval scores at steps 100, 200, ...; the low target gets `low` (a run read at the wrong target shows it)."""
    return {100 * (i + 1): {target: v, 1800: low} for i, v in enumerate(values)}


def run_report(tmp_path, *roots, plots=False, stats=False, out="out"):
    """The report's markdown and its rows by (dataset, config); stats off unless asked (they need rliable)."""
    text, rows = report.report([Path(r) for r in roots], tmp_path / out, "test", plots=plots, stats=stats)
    return text, {(r["dataset"], r["config"]): r for r in rows}


def aggregate_csv(out: Path) -> dict:
    """aggregates.csv as {(table, config, last/best, statistic): row}."""
    rows = csv.DictReader(open(out / "aggregates.csv"))
    return {(r["table"], r["config"], r["score"], r["statistic"]): r for r in rows}


def stratified_bootstrap(columns, statistic, reps=20000, seed=1):
    """The 95% percentile CI of statistic(runs x datasets matrix), each dataset's runs resampled with replacement
    on their own (the stratified bootstrap rliable implements), computed here with numpy."""
    rng = np.random.default_rng(seed)
    matrix = np.array(columns, dtype=float).T
    n = matrix.shape[0]
    resample = lambda: np.stack([matrix[rng.integers(0, n, n), task] for task in range(matrix.shape[1])], axis=1)
    values = [statistic(resample()) for _ in range(reps)]
    return np.percentile(values, [2.5, 97.5])


def iqm_by_hand(matrix):
    """Mean of the middle 50% of all scores (8 scores: the 3rd to the 6th smallest)."""
    flat = np.sort(np.ravel(matrix))
    quarter = len(flat) // 4
    return float(np.mean(flat[quarter:len(flat) - quarter]))


def test_last_and_best_mean_and_population_std_over_seeds(tmp_path):
    runs = tmp_path / "runs"
    seed_curves = {0: (40.0, 70.0, 60.0), 1: (50.0, 55.0, 65.0), 2: (30.0, 80.0, 50.0)}
    for seed, values in seed_curves.items():
        write_run(runs / f"r{seed}", seed=seed, scores=curve(*values))
    _, rows = run_report(tmp_path, runs)
    (row,) = rows.values()
    last, best = [60.0, 65.0, 50.0], [70.0, 65.0, 80.0]
    assert row["seeds"] == 3 and row["seed_list"] == "0 1 2" and row["incomplete"] == 0
    assert row["last_mean"] == pytest.approx(np.mean(last)) and row["last_std"] == pytest.approx(np.std(last))
    assert row["best_mean"] == pytest.approx(np.mean(best)) and row["best_std"] == pytest.approx(np.std(best))
    assert row["last_std"] != pytest.approx(np.std(last, ddof=1))  # population std, as stated in the table
    assert row["score"] == "normalized" and row["target"] == 3600.0


def test_per_seed_table_gives_last_and_best_at_every_target(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "r1", seed=1, update_steps=200, scores={100: {3600: 40.0, 1800: 30.0}, 200: {3600: 20.0, 1800: 35.0}})
    write_run(runs / "r0", seed=0, update_steps=200, scores={100: {3600: 10.0, 1800: 25.0}, 200: {3600: 50.0, 1800: 5.0}})
    text, _ = run_report(tmp_path, runs)
    table = text.split("Per seed, hopper-medium-v2")[1]
    assert "| seed | last @ 3600 | best † @ 3600 | last @ 1800 | best † @ 1800 |" in table
    assert table.index("| 0 | 50.00 | 50.00 | 5.00 | 25.00 |") < table.index("| 1 | 20.00 | 40.00 | 35.00 | 35.00 |")


def test_unfinished_and_missing_runs_are_listed_and_not_averaged(tmp_path):
    grid = tmp_path / "grid"
    write_run(grid / "a-seed0", seed=0, scores=curve(10.0, 20.0, 30.0))
    write_run(grid / "a-seed1", seed=1, scores=curve(50.0, 60.0, 70.0))
    write_run(grid / "a-seed2", seed=2, scores=curve(99.0, 99.0))  # stopped after the step-200 evaluation
    write_run(grid / "a-seed3", seed=3, scores={}, logged_until=250)  # crashed before its first evaluation
    write_run(grid / "a-seed4", seed=4, scores=None)  # config.yaml, no metrics.jsonl
    (grid / "a-seed5").mkdir()
    (grid / "a-seed5" / "grid.log").write_text("error: config file x.yaml does not exist\n")  # dt.py refused it
    (grid / "grid.json").write_text(json.dumps({"runs": {f"a-seed{k}": {} for k in range(7)}}))  # seed6: no folder
    text, rows = run_report(tmp_path, grid)
    (row,) = rows.values()
    assert row["seeds"] == 2 and row["seed_list"] == "0 1" and row["incomplete"] == 3
    assert row["last_mean"] == pytest.approx(50.0) and row["best_mean"] == pytest.approx(50.0)
    problems = text.split("## Not averaged in")[1]
    assert f"{grid / 'a-seed2'} | hopper-medium-v2 | 2 | partial | step 200 of 300, last evaluation at step 200" \
        in problems
    assert f"{grid / 'a-seed3'} | hopper-medium-v2 | 3 | partial | step 250 of 300, no evaluation yet" in problems
    assert f"{grid / 'a-seed4'} | hopper-medium-v2 | 4 | no metrics | nothing logged (0 of 300 steps)" in problems
    assert f"{grid / 'a-seed5'} | - | - | not started |" in problems
    assert f"{grid / 'a-seed6'} | - | - | not started | planned in" in problems
    assert "| 2 (0, 1); 3 unfinished |" in text


def test_score_is_read_at_the_highest_target_in_either_order(tmp_path):
    write_run(tmp_path / "runs" / "up", seed=0, targets=(1800, 3600), scores=curve(10.0, 20.0, 30.0, low=99.0))
    write_run(tmp_path / "runs" / "down", seed=1, targets=(3600, 1800), scores=curve(10.0, 20.0, 50.0, low=99.0))
    _, rows = run_report(tmp_path, tmp_path / "runs")
    (row,) = rows.values()  # one experiment: the order of target_returns changes no evaluation
    assert row["target"] == 3600.0
    assert row["last_mean"] == pytest.approx(40.0) and row["best_mean"] == pytest.approx(40.0)


def test_published_values_sit_beside_their_own_datasets(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "hopper", env_name="hopper-medium-v2", scores=curve(60.0, 65.0, 66.0))
    write_run(runs / "walker", env_name="walker2d-medium-replay-v2", targets=(5000, 2500),
              scores=curve(50.0, 55.0, 58.0, target=5000))
    write_run(runs / "mine", env_name="my-hopper-data", scores=curve(1.0, 2.0, 3.0))
    write_run(runs / "maze", env_name="maze2d-umaze-v1", targets=(280, 140), scores=curve(1.0, 2.0, 3.0, target=280))
    text, rows = run_report(tmp_path, runs)
    by_dataset = {dataset: row for (dataset, _), row in rows.items()}
    hopper, walker = by_dataset["hopper-medium-v2"], by_dataset["walker2d-medium-replay-v2"]
    refs = ("reference", "ref_last", "ref_last_std", "ref_best", "ref_best_std")
    # CORL's README at 6afec90: last and best, each mean ± std
    assert tuple(hopper[k] for k in refs) == ("CORL", 65.10, 1.61, 69.42, 3.64)
    assert tuple(walker[k] for k in refs) == ("CORL", 59.86, 2.73, 68.22, 1.20)
    assert by_dataset["my-hopper-data"]["reference"] == "" and by_dataset["my-hopper-data"]["family"] == "hopper"
    assert by_dataset["maze2d-umaze-v1"]["family"] == "maze2d"
    assert "| hopper-medium-v2 | " in text.split("## hopper")[1].split("##")[0]
    assert "| walker2d-medium-replay-v2 | " in text.split("## walker2d")[1].split("##")[0]
    assert "| CORL | 65.10 ± 1.61 | 69.42 ± 3.64 |" in text


def write_recipes(runs: Path) -> None:
    """hopper-medium-v2 with init kzl and init corl, walker2d-medium-v2 from before init existed, antmaze (a port)."""
    write_run(runs / "kzl", env_name="hopper-medium-v2", scores=curve(60.0, 62.0, 66.0), extra_config="init: kzl\n")
    write_run(runs / "corl", env_name="hopper-medium-v2", scores=curve(60.0, 62.0, 64.0), extra_config="init: corl\n")
    write_run(runs / "old", env_name="walker2d-medium-v2", targets=(5000, 2500),
              scores=curve(50.0, 50.0, 50.0, target=5000), extra_config="attention_init: xavier\n")
    write_run(runs / "ant", env_name="antmaze-umaze-v2", targets=(1, 0.5), scores=curve(40.0, 45.0, 50.0, target=1))


def test_reference_by_recipe_and_minari_ports_not_comparable(tmp_path):
    runs = tmp_path / "runs"
    write_recipes(runs)
    text, rows = run_report(tmp_path, runs)
    by_init = {(dataset, row["init"]): row for (dataset, _), row in rows.items()}
    kzl, corl = by_init[("hopper-medium-v2", "kzl")], by_init[("hopper-medium-v2", "corl")]
    assert (kzl["reference"], kzl["ref_last"], kzl["ref_last_std"], kzl["ref_best"]) == ("DT paper", 67.6, 1.0, None)
    assert (corl["reference"], corl["ref_last"], corl["ref_best"]) == ("CORL", 65.10, 69.42)
    old = by_init[("walker2d-medium-v2", "corl")]
    assert (old["reference"], old["ref_last"], old["ref_best"]) == ("CORL", 67.63, 74.70)
    hopper_table = text.split("## hopper")[1].split("\n## ")[0]
    assert f"| {kzl['config']} | kzl | normalized | 3600 | 1 (0) | 66.00 ± 0.00 | 66.00 ± 0.00 | DT paper | " \
        "67.60 ± 1.00 | - |" in hopper_table
    assert f"| {corl['config']} | corl | normalized | 3600 | 1 (0) | 64.00 ± 0.00 | 64.00 ± 0.00 | CORL | " \
        "65.10 ± 1.61 | 69.42 ± 3.64 |" in hopper_table
    assert "compared with ‡" in hopper_table
    assert "`init: kzl` (the DT authors' recipe) with the DT paper" in hopper_table
    assert "it selects on the test set" in hopper_table  # the footnote on best, next to the numbers

    ant = by_init[("antmaze-umaze-v2", "corl")]
    assert ant["reference"] == "none: Minari port" and ant["ref_last"] is None and ant["ref_best"] is None
    assert ant["not_comparable"] == \
        "D4RL data, not comparable: CORL's DT on D4RL's antmaze-umaze-v2: last 57.00 ± 9.82, best 64.50 ± 2.06"
    antmaze = text.split("## antmaze")[1]
    assert "| none: Minari port | - | - |" in antmaze and f"- {ant['not_comparable']}" in antmaze
    # the D4RL value appears only with its mark, in md and csv alike
    assert text.count("57.00 ± 9.82") == 1
    (ant_csv,) = [r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))
                  if r["dataset"] == "antmaze-umaze-v2"]
    assert ant_csv["ref_last"] == ant_csv["ref_best"] == "" and "not comparable" in ant_csv["not_comparable"]


def test_other_configs_are_kept_apart_and_named(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a0", seed=0, scores=curve(10.0, 10.0, 10.0), extra_config="batch_size: 64\n")
    write_run(runs / "a1", seed=1, scores=curve(20.0, 20.0, 20.0),  # other device and workers: same experiment
              extra_config="batch_size: 64\ndevice: cpu\neval_workers: 2\n")
    write_run(runs / "b0", seed=0, scores=curve(90.0, 90.0, 90.0), extra_config="batch_size: 256\n")
    text, rows = run_report(tmp_path, runs)
    assert sorted((r["seeds"], r["last_mean"]) for r in rows.values()) == [(1, 90.0), (2, 15.0)]
    assert "## Configs not averaged together" in text and "batch_size=64" in text and "batch_size=256" in text
    assert "## Repeated seeds" not in text
    write_run(runs / "b0-copy", seed=0, scores=curve(80.0, 80.0, 80.0), extra_config="batch_size: 256\n")
    text, rows = run_report(tmp_path, runs)
    assert "train_seed 0 finished in 2 folders; each counts as a seed in the mean" in text.split("## Repeated seeds")[1]


def test_returns_when_the_runs_have_no_reference_scores(tmp_path):
    write_run(tmp_path / "runs" / "r0", env_name="my-env", scores=curve(10.0, 30.0, 20.0), normalized=False)
    text, rows = run_report(tmp_path, tmp_path / "runs")
    (row,) = rows.values()
    assert row["score"] == "return" and row["last_mean"] == pytest.approx(200.0)
    assert row["best_mean"] == pytest.approx(300.0)
    assert "| my-env | " in text and "| return |" in text


def test_files_written_and_cli_errors(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("rliable")
    for seed in range(2):
        write_run(tmp_path / "runs" / f"r{seed}", seed=seed, scores=curve(40.0 + seed, 50.0, 60.0))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(tmp_path / "runs"),
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    png = out / "curves_hopper-medium-v2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(curves_hopper-medium-v2.png)" in \
        (out / "results.md").read_text()
    (row,) = csv.DictReader(open(out / "results.csv"))
    assert row["dataset"] == "hopper-medium-v2" and float(row["last_mean"]) == pytest.approx(60.0)
    profile = out / "profile_hopper.png"
    assert profile.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(profile_hopper.png)" in (out / "results.md").read_text()
    assert {r["statistic"] for r in csv.DictReader(open(out / "aggregates.csv"))} == \
        {"IQM", "median", "mean", "optimality gap"}
    assert not list(out.glob("*.tmp*"))

    missing = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(tmp_path / "nope"),
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == \
        [f"error: {tmp_path / 'nope'} is not a folder; give run folders or folders that hold them"]


def test_training_data_mean_from_the_data_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    data = tmp_path / "mine.hdf5"
    with h5py.File(data, "w") as f:
        f.attrs.update({"dataset_mean_return": 437.0, "ref_min_score": -20.0, "ref_max_score": 3234.0})
    write_run(tmp_path / "runs" / "r0", env_name="my-hopper", scores=curve(1.0, 2.0, 3.0),
              extra_config=f"dataset_path: {data}\n")
    write_run(tmp_path / "runs" / "r1", env_name="my-hopper", seed=1, scores=curve(1.0, 2.0, 3.0),
              extra_config=f"dataset_path: {data}\nref_min_score: 0.0\nref_max_score: 1000.0\n")
    text, rows = run_report(tmp_path, tmp_path / "runs")
    # the config's reference scores win over the file's, as in dt.py
    assert sorted(row["data_mean"] for row in rows.values()) == pytest.approx([100 * 457 / 3254, 43.7])
    assert "the training data's own mean episode score is 14.04" in text


def test_aggregates_against_values_computed_by_hand(tmp_path):
    pytest.importorskip("rliable")
    runs = tmp_path / "runs"
    last = {"hopper-medium-v2": [90.0, 110.0, 95.0, 105.0], "hopper-medium-replay-v2": [50.0, 60.0, 120.0, 70.0]}
    for dataset, scores in last.items():
        for seed, score in enumerate(scores):  # best = last + 5, reached at the first evaluation
            write_run(runs / f"{dataset}-{seed}", env_name=dataset, seed=seed, update_steps=200,
                      scores=curve(score + 5, score))
    write_run(runs / "mine", env_name="my-hopper", scores=curve(1.0, 2.0), normalized=False)  # returns: left out
    _, rows = run_report(tmp_path, runs, stats=True)
    table = aggregate_csv(tmp_path / "out")
    matrix = np.array(list(last.values())).T  # runs x datasets
    for which, scores in (("last", matrix), ("best", matrix + 5)):
        expected = {"IQM": iqm_by_hand(scores), "median": float(np.median(scores.mean(axis=0))),
                    "mean": float(scores.mean()), "optimality gap": float(np.mean(np.maximum(100 - scores, 0)))}
        for statistic, value in expected.items():
            row = table[("hopper", "all runs", which, statistic)]
            assert (row["datasets"], row["runs_per_dataset"]) == ("2", "4")
            assert float(row["estimate"]) == pytest.approx(value)
            assert float(row["ci_low"]) <= value <= float(row["ci_high"])
    # by hand: IQM of the 8 last scores is the mean of 70, 90, 95, 105; the gap is (10 + 5 + 50 + 40 + 30) / 8
    assert float(table[("hopper", "all runs", "last", "IQM")]["estimate"]) == pytest.approx(90.0)
    assert float(table[("hopper", "all runs", "last", "optimality gap")]["estimate"]) == pytest.approx(16.875)
    assert float(table[("hopper", "all runs", "best", "optimality gap")]["estimate"]) == pytest.approx(13.75)
    # each row's 95% CI of the mean, against a bootstrap of the mean of its 4 seeds computed here
    for (dataset, _), row in rows.items():
        if dataset in last:
            low, high = stratified_bootstrap([last[dataset]], np.mean)
            assert (row["last_ci_low"], row["last_ci_high"]) == pytest.approx((low, high), abs=1.5)


def test_ci_resamples_runs_within_each_dataset(tmp_path):
    pytest.importorskip("rliable")
    runs = tmp_path / "runs"
    columns = {"hopper-medium-v2": [10.0, 20.0, 30.0, 40.0], "hopper-medium-expert-v2": [90.0, 90.0, 90.0, 90.0]}
    for dataset, scores in columns.items():
        for seed, score in enumerate(scores):
            write_run(runs / f"{dataset}-{seed}", env_name=dataset, seed=seed, update_steps=100, scores=curve(score))
    run_report(tmp_path, runs, stats=True)
    table = aggregate_csv(tmp_path / "out")
    mean, iqm = table[("hopper", "all runs", "last", "mean")], table[("hopper", "all runs", "last", "IQM")]
    # stratified: every resample keeps 4 runs of each dataset, so the mean stays within (10 + 90) / 2 and (40 + 90) / 2
    # (resampling the 8 runs together would reach far below 50) and the IQM within (10 + 20 + 180) / 4 and 65
    assert 50.0 <= float(mean["ci_low"]) < float(mean["ci_high"]) <= 65.0
    assert 52.5 <= float(iqm["ci_low"]) < float(iqm["ci_high"]) <= 65.0
    for row, statistic in ((mean, np.mean), (iqm, iqm_by_hand)):
        low, high = stratified_bootstrap(list(columns.values()), statistic)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), abs=1.3)
    assert float(mean["ci_high"]) - float(mean["ci_low"]) > 5.0  # not a degenerate interval


def test_same_runs_give_byte_identical_reports_and_one_seed_says_so(tmp_path):
    pytest.importorskip("rliable")
    runs = tmp_path / "runs"
    for dataset in ("hopper-medium-v2", "hopper-medium-replay-v2"):
        for seed in range(3):
            write_run(runs / f"{dataset}-{seed}", env_name=dataset, seed=seed, update_steps=200,
                      scores=curve(30.0 + 7 * seed, 40.0 - seed))
    np.random.seed(1)  # rliable 1.2.0 resamples with numpy's global RNG: the report seeds it itself
    run_report(tmp_path, runs, stats=True, out="first")
    np.random.seed(2)
    state = np.random.get_state()
    run_report(tmp_path, runs, stats=True, out="second")
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]  # given back
    for name in ("results.md", "results.csv", "aggregates.csv"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
    assert "[CI needs" not in (tmp_path / "first" / "results.md").read_text()

    one = tmp_path / "one"
    for dataset in ("hopper-medium-v2", "hopper-medium-replay-v2"):
        write_run(one / dataset, env_name=dataset, update_steps=200, scores=curve(30.0, 40.0))
    text, rows = run_report(tmp_path, one, stats=True, out="single")
    assert "| 1 (0) | 40.00 ± 0.00 [CI needs >= 2 runs] | 40.00 ± 0.00 [CI needs >= 2 runs] |" in text
    assert "| all runs | 2 | 1 | last | 40.00 [CI needs >= 2 runs] |" in text
    for name in ("results.md", "results.csv", "aggregates.csv"):
        assert "nan" not in (tmp_path / "single" / name).read_text().lower()
    assert all(row["last_ci_low"] is None and row["best_ci_high"] is None for row in rows.values())


def test_compare_two_groups(tmp_path):
    pytest.importorskip("rliable")
    a_scores, b_scores = [60.0, 70.0, 80.0, 90.0], [50.0, 55.0, 60.0, 65.0]
    for side, scores, init in (("a", a_scores, "kzl"), ("b", b_scores, "corl")):
        for dataset in ("hopper-medium-v2", "walker2d-medium-v2"):
            for seed, score in enumerate(scores):
                write_run(tmp_path / side / f"{dataset}-{seed}", env_name=dataset, seed=seed,
                          update_steps=100, scores=curve(score),
                          extra_config=f"init: {init}\n")
    text, _ = report.report([tmp_path / "a"], tmp_path / "out", "test", plots=False, compare=[tmp_path / "b"])
    rows = {(r["score"], r["dataset"]): r for r in csv.DictReader(open(tmp_path / "out" / "compare.csv"))}
    # by hand: A's mean 75, B's 57.5; of the 16 (A run, B run) pairs A is higher in 14 and ties in 1 (60 and 60),
    # which counts half: P(A > B) = 14.5 / 16
    for key in (("last", "hopper-medium-v2"), ("best", "walker2d-medium-v2"), ("last", "all 2 datasets")):
        row = rows[key]
        assert (float(row["difference"]), float(row["p_improvement"])) == pytest.approx((17.5, 14.5 / 16))
        assert float(row["difference_ci_low"]) <= 17.5 <= float(row["difference_ci_high"])
        assert 0.0 <= float(row["p_improvement_ci_low"]) <= 14.5 / 16 <= float(row["p_improvement_ci_high"]) <= 1.0
    assert "## A/B comparison" in text and 'init: A "kzl", B "corl"' in text
    assert "| hopper-medium-v2 | normalized | 4 | 4 | 75.00 | 57.50 | 17.50 [" in text


def test_compare_refuses_other_datasets_update_steps_or_two_configs(tmp_path, capsys):
    write_run(tmp_path / "a" / "hopper", env_name="hopper-medium-v2", scores=curve(1.0, 2.0, 3.0))
    write_run(tmp_path / "a" / "walker", env_name="walker2d-medium-v2", scores=curve(1.0, 2.0, 3.0))
    write_run(tmp_path / "b" / "hopper", env_name="hopper-medium-v2", update_steps=400,
              scores=curve(1.0, 2.0, 3.0, 4.0))
    write_run(tmp_path / "b" / "cheetah", env_name="halfcheetah-medium-v2", scores=curve(1.0, 2.0, 3.0))

    def refused(a, b):
        with pytest.raises(SystemExit) as exit_info:
            report.main([str(a), "--compare", str(b), "--out", str(tmp_path / "out"), "--no_plots"])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and captured.out == ""
        return captured.err.splitlines()

    assert refused(tmp_path / "a", tmp_path / "b") == [
        "error: A and B are not the same datasets with the same update_steps: datasets only in A: walker2d-medium-v2; "
        "datasets only in B: halfcheetah-medium-v2; update_steps differ: hopper-medium-v2 (A 300, B 400)"]
    write_run(tmp_path / "a" / "hopper-big", env_name="hopper-medium-v2", seed=1, scores=curve(1.0, 2.0, 3.0),
              extra_config="batch_size: 256\n")
    (line,) = refused(tmp_path / "a", tmp_path / "b")
    assert line.startswith("error: A holds 2 configs of hopper-medium-v2 (") and "one config per dataset" in line


def test_missing_rliable_is_one_error_line(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "runs" / "r0", scores=curve(1.0, 2.0, 3.0))
    monkeypatch.setitem(sys.modules, "rliable", None)  # import rliable raises ImportError, as when not installed
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no_plots"])
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and line.startswith("error: the report's statistics need rliable") \
        and "pip install -r requirements-dev.txt" in line and "--no_stats" in line
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no_plots", "--no_stats"])  # tables only
    assert "statistics off (--no_stats)" in (tmp_path / "out" / "results.md").read_text()


def test_episode_length_panel_when_logged(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    for name, lengths in (("with", lambda step, target: step / 10 + (target > 2000)), ("without", None)):
        write_run(tmp_path / name / "r0", scores=curve(10.0, 20.0, 30.0), episode_length=lengths)
        run_report(tmp_path, tmp_path / name, plots=True, out=f"out-{name}")
    run = report.read_run(tmp_path / "with" / "r0")
    assert run.episode_length == [(100, 11.0), (200, 21.0), (300, 31.0)]  # the highest target's, not 1800's
    assert report.read_run(tmp_path / "without" / "r0").episode_length == []
    width = {name: matplotlib.image.imread(tmp_path / f"out-{name}" / "curves_hopper-medium-v2.png").shape[1]
             for name in ("with", "without")}
    assert width["with"] > width["without"]


def test_curves_draw_the_reference_of_each_recipe_and_none_for_a_port(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    drawn = []
    axhline = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda ax, y, **kwargs: drawn.append((ax, kwargs.get("label"))) or axhline(ax, y, **kwargs))
    write_recipes(tmp_path / "runs")
    run_report(tmp_path, tmp_path / "runs", plots=True)
    by_plot = {}
    for ax, label in drawn:  # each curves figure's title starts with its dataset
        by_plot.setdefault(ax.get_title().split(":")[0], []).append(label)
    assert sorted(by_plot["hopper-medium-v2"]) == ["CORL last 65.1", "DT paper 67.6 (reference of init kzl)"]
    assert by_plot["walker2d-medium-v2"] == ["CORL last 67.63"]
    assert "antmaze-umaze-v2" not in by_plot  # a Minari port: no published line


def test_old_attention_init_runs_read_as_init(tmp_path):
    """A run folder of older dt.py (attention_init, no init) is a seed of the same experiment as today's run of its
    init: xavier is corl, normal is normal."""
    runs = tmp_path / "runs"
    write_run(runs / "old", seed=0, scores=curve(60.0, 62.0, 64.0), extra_config="attention_init: xavier\n")
    write_run(runs / "new", seed=1, scores=curve(61.0, 63.0, 65.0), extra_config="init: corl\n")
    write_run(runs / "normal", seed=2, scores=curve(61.0, 63.0, 65.0), extra_config="attention_init: normal\n")
    _, rows = run_report(tmp_path, runs)
    assert sorted((row["init"], row["seeds"]) for row in rows.values()) == [("corl", 2), ("normal", 1)]
