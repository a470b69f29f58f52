"""benchmarks/report.py on hand-written run folders: last/best over seeds, unfinished runs, targets, paper values."""
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
              logged_until: int = None) -> Path:
    """A run folder as dt.py leaves it: config.yaml, and metrics.jsonl with train rows and eval rows.

    scores: {step: {target: normalized score mean}}; the return is 10x the score so both are checkable.
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
            rows.append(row)
    if scores is not None:
        folder.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def curve(*values, target=3600, low=0.0):
    """Eval scores at steps 100, 200, ...; the low target gets `low` (a run read at the wrong target shows it)."""
    return {100 * (i + 1): {target: v, 1800: low} for i, v in enumerate(values)}


def run_report(tmp_path, *roots, plots=False):
    text, rows = report.report([Path(r) for r in roots], tmp_path / "out", "test", plots=plots)
    return text, {(r["dataset"], r["config"]): r for r in rows}


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
    assert "| seed | last @ 3600 | best @ 3600 | last @ 1800 | best @ 1800 |" in table
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
    assert (hopper["dt_paper"], hopper["corl_last"], hopper["corl_last_std"], hopper["corl_best"]) == \
        (67.6, 65.10, 1.61, 69.42)
    assert (walker["dt_paper"], walker["corl_last"], walker["corl_last_std"], walker["corl_best"]) == \
        (66.6, 59.86, 2.73, 68.22)
    assert by_dataset["my-hopper-data"]["dt_paper"] is None and by_dataset["my-hopper-data"]["family"] == "hopper"
    assert by_dataset["maze2d-umaze-v1"]["family"] == "maze2d"
    assert "| hopper-medium-v2 | " in text.split("## hopper")[1].split("##")[0]
    assert "| walker2d-medium-replay-v2 | " in text.split("## walker2d")[1].split("##")[0]
    assert "67.60 | 65.10 ± 1.61 | 69.42 |" in text


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
