"""benchmarks/make_dataset.py: a real (tiny) SAC run on Hopper-v4, all five dataset kinds, resume."""
import sys

import h5py
import numpy as np
import pytest

import dt
from conftest import ROOT

pytest.importorskip("stable_baselines3")
sys.path.insert(0, str(ROOT / "benchmarks"))
import make_dataset  # noqa: E402

KEYS = {"observations": np.float32, "next_observations": np.float32, "actions": np.float32,
        "rewards": np.float32, "terminals": np.bool_, "timeouts": np.bool_}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("make_dataset")
    args = ["--env", "Hopper-v4", "--work_dir", str(root / "work"), "--out_dir", str(root / "out"),
            "--train_steps", "400", "--checkpoint_every", "200", "--eval_episodes", "1", "--samples", "300",
            "--medium_return", "-1000", "--seed", "3"]  # any checkpoint counts as "medium" in so short a run
    paths = make_dataset.make_datasets(make_dataset.parse_args(args))
    return root, args, {p.stem.split("_", 1)[1]: p for p in paths}


def read(path):
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_every_kind_has_d4rl_keys_dtypes_and_attributes(made):
    _, _, paths = made
    assert set(paths) == set(make_dataset.KINDS)
    for kind, path in paths.items():
        data, attrs = read(path)
        assert {k: v.dtype.type for k, v in data.items()} == KEYS, kind
        n = len(data["rewards"])
        assert all(len(v) == n for v in data.values())
        assert data["observations"].shape == (n, 11) and data["actions"].shape == (n, 3)
        assert not (data["terminals"] & data["timeouts"]).any()  # an episode ends one way
        assert data["terminals"][-1] or data["timeouts"][-1]  # the last episode is closed
        assert attrs["env_id"] == "Hopper-v4" and attrs["kind"] == kind
        assert (attrs["ref_min_score"], attrs["ref_max_score"]) == (-20.272305, 3234.3)  # D4RL's hopper: comparable
        assert attrs["dataset_mean_return"] == pytest.approx(np.mean(plain_episode_returns(data)), rel=1e-6)


def plain_episode_returns(data):
    """Episode returns by walking the steps one at a time (independent of the tool's vectorised cut)."""
    returns, current = [], 0.0
    for reward, terminal, timeout in zip(data["rewards"], data["terminals"], data["timeouts"]):
        current += float(reward)
        if terminal or timeout:
            returns.append(current)
            current = 0.0
    return returns


def test_transitions_chain_within_episodes_and_end_by_falling(made):
    _, _, paths = made
    for kind in ("random", "medium", "medium_replay"):
        data, _ = read(paths[kind])
        ends = data["terminals"] | data["timeouts"]
        inside = ~ends[:-1]  # step i and i+1 belong to the same episode
        np.testing.assert_array_equal(data["next_observations"][:-1][inside], data["observations"][1:][inside])
        # Hopper terminates when it falls: height (obs[0]) below 0.7 or torso angle beyond 0.2 rad
        fallen = data["next_observations"][data["terminals"]]
        assert ((fallen[:, 0] <= 0.7) | (np.abs(fallen[:, 1]) >= 0.2) | (np.abs(fallen[:, 1:]) >= 100).any(1)).all()


def test_medium_replay_is_the_buffer_up_to_the_medium_policy_and_medium_expert_concatenates(made):
    _, _, paths = made
    replay, attrs = read(paths["medium_replay"])
    assert attrs["behavior_policy_step"] == 200  # first checkpoint that reached --medium_return
    assert len(replay["rewards"]) == 200  # the transitions of env steps 1..200
    medium, _ = read(paths["medium"])
    expert, _ = read(paths["expert"])
    both, _ = read(paths["medium_expert"])
    for key in KEYS:
        np.testing.assert_array_equal(both[key], np.concatenate([medium[key], expert[key]]))
    assert len(medium["rewards"]) == len(expert["rewards"]) == 300  # --samples, exactly


def test_dt_trains_on_the_files_by_config_alone(made):
    _, _, paths = made
    config = dt.TrainConfig(env_name="my-hopper", dataset_path=str(paths["medium_replay"]))
    source = dt.resolve_dataset(config)
    assert (source.eval_env, source.ref_min_score, source.ref_max_score) == ("Hopper-v4", *dt.D4RL_REF_SCORES["hopper"])
    raw = dt.load_d4rl_hdf5(source.path)
    assert len(raw["rewards"]) == 200


def test_rerunning_resumes_training_and_skips_written_files(made):
    root, args, paths = made
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    longer = [*args[:args.index("--train_steps") + 1], "600", *args[args.index("--train_steps") + 2:]]
    make_dataset.make_datasets(make_dataset.parse_args(longer))
    progress = (root / "work" / "progress.json").read_text()
    assert '"step": 600' in progress and progress.count('"step"') == 3  # 200 and 400 kept, 600 added
    assert sorted(p.name for p in (root / "work").glob("replay_*.pkl")) == ["replay_600.pkl"]
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps  # existing datasets are not rewritten
