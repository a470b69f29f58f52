"""benchmarks/gpu_check.sh itself: its dry run (every step on CPU with tiny sizes, as CI runs it) and the
summary's verdicts when steps fail. Real runs of the script, its Python steps and dt.py."""
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import ROOT

STEPS = ["install", "cuda_tests", "train_speed_fp32", "train_speed_tf32", "train_speed_bf16", "train_speed_bf16_compile",
         "eval_speed", "train_run", "eval_only_cpu"]


def gpu_check(args, tmp_path, out=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "OUT"}
    env.update(HOME=str(tmp_path / "home"), **({"OUT": str(out)} if out else {}))
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--python", sys.executable,
                           "--log_dir", str(tmp_path / "logs"), *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)


def table_rows(stdout):
    """{first cell: cells} of the markdown tables the summary prints."""
    rows = [line.strip("|").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def test_dry_run_runs_every_step_and_prints_one_summary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = gpu_check(["--dry_run"], tmp_path, out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = table_rows(result.stdout)
    assert [name for name in rows if name in STEPS] == STEPS  # every step, in order, once
    assert all(rows[name][1] == "ok" for name in STEPS), result.stdout
    assert re.fullmatch(r"0 passed, \d+ skipped, 0 failed", rows["cuda_tests"][3])  # run, and skipped without a GPU
    for name in STEPS[2:6]:  # on CPU TF32 and bf16 change nothing, but the TF32 step says what it asked for
        assert re.match(r"batch 16: [\d.]+ updates/s, sampling [\d.]+%, MFU [\d.]+% of the float32"
                        + (r" \(TF32\)" if name.endswith("tf32") else "") + " matmul peak", rows[name][3])
    assert re.match(r"4 episodes: batched \d+ episode-steps/s .* vs \d+ one at a time: [\d.]+x", rows["eval_speed"][3])
    assert rows["train_run"][3].startswith("20 updates at batch 16 on cpu, bf16 True, compile False, fused AdamW True")
    # eval-only of the checkpoint on CPU, with the training's seeds and targets: the training's returns (CPU here)
    pairs = re.findall(r"(\d+\.\d): ([\d.-]+) \(in training: ([\d.-]+)\)", rows["eval_only_cpu"][3])
    assert [t for t, _, _ in pairs] == ["1500.0", "500.0"] and all(a == b for _, a, b in pairs)
    assert "Projected full CORL-schedule run: 100000 updates /" in result.stdout
    for target in ("training MFU, bf16 at batch 4096", "sampling share of an update",
                   "batched evaluation vs one episode at a time", "projected full CORL-schedule run"):
        assert rows[target][4] in ("met", "NOT met")
    assert result.stdout.rstrip().endswith("0 of 9 steps failed")

    logs = tmp_path / "logs"
    assert all((logs / f"{name}.log").stat().st_size > 0 for name in STEPS)  # each step's raw output
    assert (logs / "train_run" / "latest.pt").exists()
    with tarfile.open(out / "gpu_check_logs.tar.gz") as archive:  # $OUT: the logs in one file, no checkpoints
        names = archive.getnames()
    assert {f"./{name}.log" for name in STEPS} <= set(names) and not any(n.endswith(".pt") for n in names)
    assert (out / "gpu_check_summary.md").read_text() == (logs / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the steps fail here only where there is no GPU")
def test_failed_and_unreached_steps_are_reported_and_fail_the_check(tmp_path):
    # without a GPU the real steps fail; the others still run, and the table says why each failed
    result = gpu_check(["--no_install", "--steps", "install,train_speed_fp32,eval_speed"], tmp_path)
    assert result.returncode == 1
    rows = table_rows(result.stdout)
    assert rows["install"][1] == "not run"
    for name in ("train_speed_fp32", "eval_speed"):
        assert rows[name][1] == "FAILED"
        assert rows[name][3] == "exit status 1: error: device 'cuda' was requested but CUDA is not available here; " \
                                "use --device auto or --device cpu"
    assert "train_run" not in rows  # not selected
    assert result.stdout.rstrip().endswith("2 of 3 steps failed: train_speed_fp32, eval_speed")

    result = gpu_check(["--dry_run", "--budget", "20", "--steps", "train_run"], tmp_path)  # 15 s kept for the table
    assert result.returncode == 1
    assert table_rows(result.stdout)["train_run"][1:] == ["FAILED", "0", "not started: the time budget was spent"]

    result = gpu_check(["--steps", "train,eval"], tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown step 'train'")
