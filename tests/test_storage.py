"""Storage faults on the real thing: a full tmpfs at a checkpoint, a metrics row and a video, a read-only bind mount
and a deleted folder mid-run, the write order under strace, damaged checkpoints, and downloads from a loopback HTTP
server that cuts bodies short, answers 503 or stalls. Mounting needs root: elsewhere these tests skip, in CI fail."""
import contextlib
import functools
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import dt
from conftest import IN_CI, ROOT

TINY = ["--env_name", "hopper-medium-v2", "--update_steps", "300", "--eval_every", "100", "--log_every", "10",
        "--batch_size", "8", "--eval_episodes", "2", "--target_returns", "[3600,1800]", "--seq_len", "5",
        "--embedding_dim", "16", "--num_layers", "1", "--warmup_steps", "50", "--learning_rate", "1e-3",
        "--eval_workers", "0", "--deterministic_torch", "true", "--device", "cpu"]


def need_root(what: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        message = f"{what} needs root and mount(8) (a real tmpfs or bind mount); run the suite as root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A real tmpfs of `size` mounted on folder (made if missing), unmounted afterwards."""
    need_root("a full file system")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="module")
def env(hopper_file, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="disabled", D4RL_DATASET_DIR=str(hopper_file.parent),
               HOME=str(tmp_path_factory.mktemp("home")))
    return env


def dt_run(args, env, cwd=None, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "algorithms/dt.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("full") / "run"
    result = dt_run([*TINY, "--run_dir", str(folder)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def weights(path: Path):
    return torch.load(path, weights_only=False)["model_state"]


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def leftovers(*folders: Path):
    return [p.name for folder in folders for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".part.mp4")]


# --- Durable writes -------------------------------------------------------------------------------------------
def traced_run(args, env, trace: Path):
    """dt.py under strace -f -y -> its fsync and rename calls in order: ("fsync", path) or ("rename", source, target)."""
    result = subprocess.run(["strace", "-f", "-y", "-o", str(trace), "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                             sys.executable, str(ROOT / "algorithms/dt.py"), *args],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = []
    for line in trace.read_text().splitlines():
        if match := re.search(r"f(?:data)?sync\(\d+<([^>]+)>\) = 0", line):
            events.append(("fsync", match[1]))
        elif match := re.search(r'rename(?:at2?)?\((?:[^"]*, )?"([^"]+)", (?:[^"]*, )?"([^"]+)"', line):
            events.append(("rename", match[1], match[2]))
    return events


def test_writes_fsync_file_then_rename_then_fsync_folder(env, tmp_path, uninterrupted):
    """Every file a resume needs is fsynced, renamed into place, then its folder fsynced; metrics.jsonl is fsynced
    at each checkpoint, not at each row. A new run, then a resume (which rewrites metrics.jsonl)."""
    if shutil.which("strace") is None:
        (pytest.fail if IN_CI else pytest.skip)("needs strace (apt-get install strace)")
    run = tmp_path / "run"
    fresh = traced_run([*TINY, "--run_dir", str(run)], env, tmp_path / "fresh")
    damage(run / "latest.pt", "zero-length")  # resume from latest.prev.pt (step 200): metrics.jsonl is cut back
    resumed = traced_run(["--run_dir", str(run)], env, tmp_path / "resumed")
    for events, expected in ((fresh, {"config.yaml", "wandb_run_id", "best.pt", "latest.pt"}),
                             (resumed, {"metrics.jsonl", "wandb_run_id", "latest.pt"})):
        renamed = {Path(e[2]).name for e in events if e[0] == "rename" and ".tmp-" in e[1]}
        assert expected <= renamed, renamed
        for i, event in enumerate(events):
            if event[0] == "rename" and ".tmp-" in event[1]:
                source, target = event[1], Path(event[2])
                assert ("fsync", source) in events[:i], f"{source} renamed before its fsync"
                assert ("fsync", str(target.parent)) in events[i + 1:], f"{target.parent} not fsynced after the rename"
    # latest.pt's previous version is kept: renamed to latest.prev.pt just before the new one lands (the resumed run
    # set its damaged latest.pt aside, so its one checkpoint had nothing to rotate)
    rotations = [i for i, e in enumerate(fresh) if e[0] == "rename" and e[2].endswith("latest.prev.pt")]
    assert len(rotations) == 2 and all(fresh[i + 1][2].endswith("latest.pt") for i in rotations)
    rows = (run / "metrics.jsonl").read_text().count("\n")
    assert sum(e == ("fsync", str(run / "metrics.jsonl")) for e in fresh) == 3 < rows  # at the 3 checkpoints only


# --- Full disks -------------------------------------------------------------------------------------------------
def test_full_disk_at_a_checkpoint_keeps_the_previous_and_resumes_exactly(env, tmp_path, uninterrupted):
    size = (uninterrupted / "latest.pt").stat().st_size
    pages = -(-size // 4096)
    run, ckpts = tmp_path / "run", tmp_path / "ckpts"
    # room for latest.pt and best.pt of step 100, not for a third checkpoint file
    with tmpfs(ckpts, f"{(2 * pages + pages // 2) * 4}k"):
        result = dt_run([*TINY, "--run_dir", str(run), "--checkpoints_path", str(ckpts)], env)
        assert result.returncode == 2
        line = error_line(result.stderr)
        assert f"the disk or quota holding {ckpts / 'run'} is full" in line
        assert f"resume with: python algorithms/dt.py --run_dir {run}" in line
        assert dt.load_checkpoint(ckpts / "run" / "latest.pt")["step"] == 100  # the previous one, intact
        assert not leftovers(ckpts, run)
        subprocess.run(["mount", "-o", "remount,size=4m", str(ckpts)], check=True)  # space freed
        resumed = dt_run(["--run_dir", str(run)], env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming from step 100" in resumed.stdout
        assert_same_weights(ckpts / "run" / "latest.pt", uninterrupted / "latest.pt")
    assert (run / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


def test_full_disk_at_a_metrics_row_keeps_whole_lines(env, tmp_path, uninterrupted):
    run = tmp_path / "run"
    with tmpfs(run, "12k"):  # three pages: config.yaml, wandb_run_id, then metrics.jsonl fills the third
        result = dt_run([*TINY, "--run_dir", str(run), "--checkpoints_path", str(tmp_path / "ckpts")], env)
        assert result.returncode == 2
        line = error_line(result.stderr)
        assert f"the disk or quota holding {run} is full" in line and "metrics.jsonl" in line
        text = (run / "metrics.jsonl").read_text()
        assert text.endswith("\n") and len(text) <= 4096 and text.count("\n") >= 10  # whole lines only
        assert not leftovers(run)
        subprocess.run(["mount", "-o", "remount,size=4m", str(run)], check=True)
        resumed = dt_run(["--run_dir", str(run)], env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_weights(tmp_path / "ckpts" / "run" / "latest.pt", uninterrupted / "latest.pt")
        assert (run / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


def test_disk_filled_by_wandb_offline_files_ends_with_one_line(env, tmp_path):
    """wandb writes from its own process and drops what does not fit; the run's own next write stops it."""
    run = tmp_path / "run"
    with tmpfs(run, "40k"):  # measured: wandb starts, then its files and metrics.jsonl fill it
        result = dt_run([*TINY, "--run_dir", str(run), "--checkpoints_path", str(tmp_path / "ckpts"), "--log_every", "1"],
                        {**env, "WANDB_MODE": "offline"})  # a row per update: wandb's files and metrics.jsonl grow
        assert result.returncode == 2
        assert f"the disk or quota holding {run} is full" in error_line(result.stderr)
        assert not leftovers(run)


def test_full_disk_at_a_video_drops_it_and_training_goes_on(env, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    run = tmp_path / "run"
    with tmpfs(run / "videos", "4k"):  # far too small for an mp4
        result = dt_run([*TINY, "--run_dir", str(run), "--eval_video", "1", "--episode_len", "100"], env)
        assert result.returncode == 0, result.stderr[-3000:]
        dropped = re.findall(r"warning: video (\S+) dropped", result.stderr)
        assert dropped and not [p for p in dropped if Path(p).exists()]  # no partial mp4 left
        imageio = pytest.importorskip("imageio")
        for kept in (run / "videos").iterdir():  # the ones that fitted are whole
            assert not kept.name.endswith(".part.mp4") and len(imageio.mimread(kept)) > 0
    assert dt.load_checkpoint(run / "latest.pt")["step"] == 300  # the run finished


# --- Folders made read-only or deleted mid-run -----------------------------------------------------------------
def start_long_run(env, run: Path) -> subprocess.Popen:
    args = [*TINY, "--update_steps", "100000", "--eval_every", "50000", "--run_dir", str(run)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "algorithms/dt.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").stat().st_size == 0:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def test_run_folder_made_read_only_mid_run_ends_with_one_line(env, tmp_path):
    need_root("a read-only bind mount")
    run = tmp_path / "run"
    run.mkdir()
    subprocess.run(["mount", "--bind", str(run), str(run)], check=True)
    try:
        proc = start_long_run(env, run)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(run)], check=True)
        _, stderr = proc.communicate(timeout=120)
    finally:
        subprocess.run(["umount", "-l", str(run)], check=False)
    assert proc.returncode == 2
    line = error_line(stderr)
    assert f"{run} became read-only" in line and f"--run_dir {run}" in line


def test_run_folder_deleted_mid_run_ends_with_one_line(env, tmp_path):
    run = tmp_path / "run"
    proc = start_long_run(env, run)
    shutil.rmtree(run)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"{run} was deleted or moved away" in error_line(stderr)


# --- Damaged checkpoints ------------------------------------------------------------------------------------------
def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "zero-length":
        path.write_bytes(b"")
    else:  # 64 flipped bytes in the middle: inside a tensor, where torch.load does not look
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        path.write_bytes(data)


@pytest.mark.parametrize("how", ["truncated", "zero-length", "flipped"])
def test_damaged_latest_is_detected_and_resume_falls_back_to_the_previous(env, tmp_path, uninterrupted, how):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    damage(run / "latest.pt", how)  # the step-300 checkpoint; latest.prev.pt holds step 200
    evaluated = dt_run(["--eval_checkpoint", str(run / "latest.pt"), "--runs_dir", str(tmp_path / "evals")], env)
    assert evaluated.returncode == 2 and f"cannot read checkpoint {run / 'latest.pt'}" in error_line(evaluated.stderr)
    resumed = dt_run(["--run_dir", str(run)], env)  # not "nothing to do", not from scratch: from step 200
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"warning: cannot read checkpoint {run / 'latest.pt'}" in resumed.stderr
    assert "resuming from step 200" in resumed.stdout
    assert (run / "latest.damaged.pt").exists()  # set aside: the next checkpoint kept the good one as latest.prev.pt
    assert dt.load_checkpoint(run / "latest.prev.pt")["step"] == 200
    assert_same_weights(run / "latest.pt", uninterrupted / "latest.pt")
    assert (run / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


def test_damaged_latest_without_a_previous_one_stops_with_its_name(env, tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "latest.prev.pt").unlink()
    damage(run / "latest.pt", "flipped")
    result = dt_run(["--run_dir", str(run)], env)
    assert result.returncode == 2 and f"cannot read checkpoint {run / 'latest.pt'}" in error_line(result.stderr)


# --- Downloads --------------------------------------------------------------------------------------------------
class MisbehavingServer(http.server.BaseHTTPRequestHandler):
    """Serves `body` at /<mode>: drop (the first answer stops half way, then Range is honoured), busy (503 twice,
    then 200), short (always half the body, ignoring Range), stall (a few bytes, then silence), ok."""
    body, requests = b"", []

    def do_GET(self):
        mode, body = self.path.strip("/"), self.body
        type(self).requests.append((mode, self.headers.get("Range")))
        count = sum(m == mode for m, _ in type(self).requests)
        if mode == "busy" and count <= 2:
            self.send_error(503)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        if mode in ("short", "stall") or (mode == "drop" and count == 1):
            start = 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode in ("drop", "short") and count == 1 or mode == "short":
            self.wfile.write(body[:len(body) // 2])
            return  # the connection closes with the body short of Content-Length
        if mode == "stall":
            self.wfile.write(body[:100])
            self.wfile.flush()
            time.sleep(5)
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def d4rl_file(tmp_path_factory) -> Path:
    """A D4RL-layout file of 1 MB: a download in several chunks."""
    path = tmp_path_factory.mktemp("served") / "hopper_medium-v2.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for key, shape in (("observations", (20000, 11)), ("actions", (20000, 3)), ("rewards", (20000,))):
            f[key] = rng.normal(size=shape).astype(np.float32)
        f["terminals"], f["timeouts"] = np.zeros(20000, bool), np.arange(20000) % 1000 == 999
    return path


@pytest.fixture()
def server(d4rl_file, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    handler = type("Handler", (MisbehavingServer,), {"body": d4rl_file.read_bytes(), "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("mode", ["drop", "busy"])
def test_download_recovers_from_a_cut_body_and_from_503(server, tmp_path, mode, d4rl_file):
    handler, url = server
    target = tmp_path / "d4rl" / "hopper_medium-v2.hdf5"
    dt.download(f"{url}/{mode}", target, attempts=4, timeout=5)
    assert target.read_bytes() == d4rl_file.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    ranges = [r for m, r in handler.requests if m == mode]
    if mode == "drop":  # resumed from the last whole chunk before the cut, not from the start
        assert len(ranges) == 2 and ranges[0] == "bytes=0-"
        assert 0 < int(ranges[1][6:-1]) <= len(handler.body) // 2
    else:
        assert len(ranges) == 3  # two 503s, retried with backoff


def test_download_never_renames_a_short_body_into_place(server, tmp_path):
    _, url = server
    target = tmp_path / "d4rl" / "hopper_medium-v2.hdf5"
    with pytest.raises(dt.UserError, match=f"downloading it from {url}/short failed"):
        dt.download(f"{url}/short", target, attempts=2, timeout=5)
    assert list(target.parent.iterdir()) == []


def test_download_stall_ends_in_a_clear_error_after_the_timeout(server, tmp_path):
    _, url = server
    target = tmp_path / "d4rl" / "hopper_medium-v2.hdf5"
    started = time.monotonic()
    with pytest.raises(dt.UserError, match="timed out"):
        dt.download(f"{url}/stall", target, attempts=2, timeout=1)
    assert 2 <= time.monotonic() - started < 15  # two stalls of 1 s and a 1 s backoff, not the server's 5 s each
    assert list(target.parent.iterdir()) == []


def test_download_checks_the_d4rl_keys_before_it_counts(server, tmp_path):
    handler, url = server
    handler.body = b"<html>a captive portal's page, not HDF5</html>"
    target = tmp_path / "d4rl" / "hopper_medium-v2.hdf5"
    with pytest.raises(dt.UserError, match="download it by hand"):
        dt.download(f"{url}/ok", target, attempts=2, timeout=5)
    assert list(target.parent.iterdir()) == []


# --- A grid whose one run's disk fills up ------------------------------------------------------------------------
def test_grid_run_on_a_full_disk_fails_with_its_line_and_the_others_finish(env, tmp_path):
    config = tmp_path / "tiny.yaml"
    fields = dict(zip(TINY[::2], TINY[1::2]))
    config.write_text("".join(f"{k[2:]}: {v}\n" for k, v in fields.items()))
    grid_dir = tmp_path / "grid"
    grid = [sys.executable, str(ROOT / "benchmarks/grid.py")]
    with tmpfs(grid_dir / "tiny-seed1", "64k"):  # its logs and metrics fit, its first checkpoint does not
        result = subprocess.run([*grid, "run", "--configs", str(config), "--seeds", "0", "1", "--grid_dir",
                                 str(grid_dir), "--parallel", "2"], env=env, capture_output=True, text=True, timeout=600)
        status = subprocess.run([*grid, "status", "--grid_dir", str(grid_dir)], env=env, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = result.stdout[result.stdout.index(f"grid {grid_dir}: "):]
    assert "1 of 2 runs finished, 1 failed" in summary
    assert re.search(r"FAILED tiny-seed1: .*error: the disk or quota holding .*tiny-seed1 is full", summary), summary
    (failed,) = [line for line in status.stdout.splitlines() if line.startswith("tiny ") and " 1 " in line]
    assert "failed" in failed and "the disk or quota holding" in failed
    assert dt.load_checkpoint(grid_dir / "tiny-seed0" / "latest.pt")["step"] == 300  # the other run went on
