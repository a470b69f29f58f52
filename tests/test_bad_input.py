"""Bad input ends in one clear `error:` line on stderr, exit code 2, no traceback and no file left behind.

One table drives it: each case names a setup (files it needs), the command-line arguments, and words the
message must contain (what is wrong, and how to fix it or what was expected).
"""
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import dt
from conftest import write_d4rl_file

BASE = ["--env_name", "hopper-medium-v2", "--update_steps", "4", "--eval_every", "4", "--batch_size", "4",
        "--eval_episodes", "1", "--seq_len", "5", "--embedding_dim", "16", "--num_layers", "1", "--warmup_steps", "2",
        "--device", "cpu", "--eval_workers", "0"]


def hdf5_without(key):
    def make(tmp: Path) -> list:
        data = write_d4rl_file(tmp / "own.hdf5", episodes=2, max_steps=20)
        with h5py.File(tmp / "own.hdf5", "w") as f:
            for k, v in data.items():
                if k != key:
                    f.create_dataset(k, data=v)
        return ["--dataset_path", str(tmp / "own.hdf5"), "--eval_env", "Hopper-v4"]
    return make


def hdf5_edited(edit):
    def make(tmp: Path) -> list:
        data = write_d4rl_file(tmp / "own.hdf5", episodes=2, max_steps=20)
        edit(data)
        with h5py.File(tmp / "own.hdf5", "w") as f:
            for k, v in data.items():
                f.create_dataset(k, data=v)
        return ["--dataset_path", str(tmp / "own.hdf5"), "--eval_env", "Hopper-v4"]
    return make


def set_nan(key, value=np.nan):
    return hdf5_edited(lambda d: d[key].__setitem__(3, value))


def truncate(key, n):
    return hdf5_edited(lambda d: d.__setitem__(key, d[key][:n]))


def empty(d):
    for k in list(d):
        d[k] = d[k][:0]


def zero_features(d):
    d["observations"] = d["observations"][:, :0]


def byte_strings(key):
    return hdf5_edited(lambda d: d.__setitem__(key, np.array([b"step"] * len(d[key]))))


def a_folder(tmp: Path) -> list:
    (tmp / "my_data").mkdir()
    return ["--dataset_path", str(tmp / "my_data"), "--eval_env", "Hopper-v4"]


def file_with(name, content):
    def make(tmp: Path) -> list:
        (tmp / name).write_bytes(content)
        return []
    return make


def yaml_config(text):
    def make(tmp: Path) -> list:
        (tmp / "config.yaml").write_text(text)
        return ["--config_path", str(tmp / "config.yaml")]
    return make


def under_a_file(field):
    def make(tmp: Path) -> list:
        (tmp / "a_file").write_text("not a folder")
        return [f"--{field}", str(tmp / "a_file" / "out")]
    return make


def no_network(tmp: Path) -> list:
    (tmp / "empty").mkdir()
    os.environ["D4RL_DATASET_DIR"] = str(tmp / "empty")  # restored by the monkeypatch in the test
    return ["--env_name", "walker2d-medium-replay-v2"]


def needs_video_packages() -> None:
    for module in ("imageio", "imageio_ffmpeg", "PIL"):  # else the missing package is the error, not rendering
        pytest.importorskip(module)


def no_offscreen_rendering(tmp: Path) -> list:
    needs_video_packages()
    os.environ["MUJOCO_GL"] = "nonsense"  # restored by the monkeypatch in the test; gymnasium rejects it at render
    return ["--eval_video", "1"]


def eval_only_without_rendering(tmp: Path, checkpoint: Path) -> list:
    needs_video_packages()
    os.environ["MUJOCO_GL"] = "nonsense"
    return ["--eval_checkpoint", str(checkpoint), "--eval_video", "1"]


eval_only_without_rendering.needs_checkpoint = True


def hub_rows_with_an_empty_trajectory(tmp: Path) -> list:
    datasets = pytest.importorskip("datasets")
    step = [[0.0] * 11]
    rows = {"observations": [step * 3, []], "actions": [[[0.0] * 3] * 3, []], "rewards": [[1.0] * 3, []],
            "dones": [[False, False, True], []]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp / "hub"))
    return ["--dataset_source", "hf", "--dataset_path", str(tmp / "hub")]


def run_dir_with(checkpoint_keys):
    def make(tmp: Path, checkpoint: Path) -> list:
        import torch
        run = tmp / "run"
        run.mkdir()
        (run / "config.yaml").write_text((checkpoint.parent / "config.yaml").read_text())
        full = torch.load(checkpoint, weights_only=False)
        torch.save({k: full[k] for k in checkpoint_keys}, run / "latest.pt")
        return ["--run_dir", str(run)]
    make.needs_checkpoint = True
    return make


def with_checkpoint(*args):
    def make(tmp: Path, checkpoint: Path) -> list:
        return ["--eval_checkpoint", str(checkpoint), *args]
    make.needs_checkpoint = True
    return make


CASES = [
    # (id, setup or None, args, fragments the one error line must contain)
    ("unknown dataset version", None, ["--env_name", "hopper-medium-v3"], ["hopper-medium-v3", "hopper-medium-v2"]),
    ("misspelt env", None, ["--env_name", "hoper-medium-replay-v2"], ["hopper-medium-replay-v2"]),
    ("unknown eval env", hdf5_edited(lambda d: None), ["--eval_env", "Hoper-v4"], ["Hoper-v4", "Hopper-v4"]),
    ("dataset missing, no network", no_network, [], ["walker2d_medium_replay-v2.hdf5", "https://rail.eecs.berkeley.edu"]),
    ("dataset_path missing", None, ["--dataset_path", "nope.hdf5"], ["nope.hdf5", "does not exist"]),
    ("dataset_path is a folder", a_folder, [], ["my_data' is a folder", "HDF5 file"]),
    ("byte-string observations", byte_strings("observations"), [], ["'observations' has dtype |S4", "float32"]),
    ("byte-string terminals", byte_strings("terminals"), [], ["'terminals' has dtype |S4", "bool"]),
    ("missing HDF5 key", hdf5_without("timeouts"), [], ["missing HDF5 keys ['timeouts']"]),
    ("mismatched lengths", truncate("actions", 10), [], ["differ in length", "actions has 10"]),
    ("NaN observation", set_nan("observations"), [], ["'observations'", "NaN or inf"]),
    ("inf reward", set_nan("rewards", np.inf), [], ["'rewards'", "NaN or inf"]),
    ("empty dataset", hdf5_edited(empty), [], ["no transitions"]),
    ("zero-length trajectory", hub_rows_with_an_empty_trajectory, [], ["row 1 has no observations"]),
    ("zero-size observations", hdf5_edited(zero_features), [], ["observations", "no features"]),
    ("not an HDF5 file", file_with("bad.hdf5", b"this is not hdf5"), ["--dataset_path", "bad.hdf5", "--eval_env", "Hopper-v4"],
     ["cannot read", "bad.hdf5"]),
    ("trajectory longer than episode_len", None, ["--episode_len", "10"], ["episode_len=10", "raise episode_len"]),
    ("seq_len 0", None, ["--seq_len", "0"], ["seq_len", "positive"]),
    ("negative batch_size", None, ["--batch_size", "-1"], ["batch_size", "positive"]),
    ("update_steps 0", None, ["--update_steps", "0"], ["update_steps", "positive"]),
    ("eval_episodes 0", None, ["--eval_episodes", "0"], ["eval_episodes", "positive"]),
    ("max_action 0", None, ["--max_action", "0"], ["max_action", "positive"]),
    ("empty target_returns", None, ["--target_returns", "[]"], ["target_returns is empty"]),
    ("target_returns not a list", None, ["--target_returns", "3600"], ["target_returns", "[3600,1800]"]),
    ("dropout 1", None, ["--attention_dropout", "1.0"], ["attention_dropout", "[0, 1)"]),
    ("negative dropout", None, ["--residual_dropout", "-0.1"], ["residual_dropout", "[0, 1)"]),
    ("heads do not divide width", None, ["--num_heads", "3"], ["divisible by num_heads"]),
    ("inverted reference scores", None, ["--ref_min_score", "10", "--ref_max_score", "5"], ["ref_min_score < ref_max_score"]),
    ("unknown device", None, ["--device", "tpu"], ["unknown device 'tpu'"]),
    ("unknown attention_init", None, ["--attention_init", "kaiming"], ["attention_init", "xavier or normal"]),
    ("unknown lr_schedule", None, ["--lr_schedule", "linear"], ["lr_schedule", "constant or cosine"]),
    ("negative seed", None, ["--eval_seed", "-1"], ["eval_seed must be >= 0"]),
    ("betas out of range", None, ["--betas", "[0.9,1.5]"], ["betas", "[0, 1)"]),
    ("negative weight decay", None, ["--weight_decay", "-1"], ["weight_decay must be >= 0"]),
    ("wrong type on the command line", None, ["--batch_size", "abc"], ["batch_size", "abc"]),
    ("unknown YAML field", yaml_config("env_name: hopper-medium-v2\nbatchsize: 4\n"), [], ["batchsize"]),
    ("wrong type in YAML", yaml_config("eval_seed: twenty\n"), [], ["eval_seed", "twenty"]),
    ("config file missing", None, ["--config_path", "nope.yaml"], ["nope.yaml"]),
    ("unwritable runs_dir", under_a_file("runs_dir"), [], ["cannot write", "a_file"]),
    ("unwritable checkpoints_path", under_a_file("checkpoints_path"), [], ["cannot write", "a_file"]),
    ("checkpoint missing", None, ["--eval_checkpoint", "nope.pt"], ["nope.pt", "does not exist"]),
    ("corrupt checkpoint", file_with("bad.pt", b"\x00garbage"), ["--eval_checkpoint", "bad.pt"], ["cannot read checkpoint", "bad.pt"]),
    ("checkpoint for other state/action sizes", with_checkpoint("--eval_env", "Walker2d-v4"), [],
     ["state/action sizes 11/3", "Walker2d-v4 has 17/6"]),
    ("run_dir whose checkpoint cannot resume", run_dir_with(dt.CHECKPOINT_KEYS), [], ["cannot resume", "optimizer_state"]),
    ("checkpoint of another dataset", with_checkpoint("--env_name", "walker2d-medium-v2"), [],
     ["trained on hopper-medium-v2", "walker2d-medium-v2"]),
    ("negative eval_video", None, ["--eval_video", "-1"], ["eval_video must be in [0, eval_episodes=1]", "-1"]),
    ("eval_video above eval_episodes", None, ["--eval_video", "2"], ["eval_video must be in [0, eval_episodes=1]"]),
    ("no offscreen rendering", no_offscreen_rendering, [], ["cannot render offscreen with MUJOCO_GL=nonsense",
                                                            "apt-get install libegl1"]),
    ("no offscreen rendering in eval-only", eval_only_without_rendering, [], ["MUJOCO_GL=nonsense", "libgl1-mesa-dri"]),
    ("val_fraction 1", None, ["--val_fraction", "1.0"], ["val_fraction must be in [0, 1)"]),
    ("negative val_fraction", None, ["--val_fraction", "-0.1"], ["val_fraction must be in [0, 1)"]),
    ("val_fraction holding out no trajectory", None, ["--val_fraction", "0.01"],
     ["9 trajectories holds out 0", "at least one trajectory on each side"]),
    ("val_fraction holding out every trajectory", None, ["--val_fraction", "0.99"], ["holds out 9"]),
]


@pytest.fixture(scope="module")
def checkpoint(hopper_file, tmp_path_factory):
    runs = tmp_path_factory.mktemp("ckpt_run")
    old = dict(os.environ)
    os.environ.update(WANDB_MODE="disabled", D4RL_DATASET_DIR=str(hopper_file.parent))
    try:
        config = dt.pyrallis.parse(config_class=dt.TrainConfig, args=[*BASE, "--run_dir", str(runs / "run")])
        dt.train(config)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return runs / "run" / "latest.pt"


def snapshot(root: Path) -> set:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("name, setup, args, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(name, setup, args, fragments, hopper_file, checkpoint, tmp_path, monkeypatch,
                                     capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(hopper_file.parent))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # no network, whatever the machine
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))  # a setup may change it
    extra = []
    if setup is not None:
        extra = setup(tmp_path, checkpoint) if getattr(setup, "needs_checkpoint", False) else setup(tmp_path)
    before = snapshot(tmp_path)
    data_before = snapshot(hopper_file.parent)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        dt.main([*BASE, "--runs_dir", str(tmp_path / "runs"), *extra, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "a file was left behind"
    assert snapshot(hopper_file.parent) == data_before


def test_table_has_at_least_20_cases():
    assert len(CASES) >= 20


def test_long_warmup_is_allowed_but_warned(hopper_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(hopper_file.parent))
    config = dt.pyrallis.parse(config_class=dt.TrainConfig,
                               args=[*BASE, "--warmup_steps", "100", "--runs_dir", str(tmp_path / "runs")])
    metrics = dt.train(config)
    assert "warning: warmup_steps (100) > update_steps (4)" in capsys.readouterr().err
    assert metrics["learning_rate"] == pytest.approx(4 / 100 * 1e-4)  # still warming up at the last update
