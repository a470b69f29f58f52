"""Dataset resolution, download, HDF5 loading, trajectory cutting, returns-to-go, state statistics."""
import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

import dt

# D4RL's (random, expert) returns, d4rl/infos.py: the normalized score's references
D4RL_REFERENCES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
                   "walker2d": (1.629008, 4592.3)}


def test_cut_trajectories_at_terminals_and_timeouts_keeps_trailing_piece():
    terminals = np.array([0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], dtype=bool)
    starts, lengths = dt.cut_trajectories(terminals, timeouts)
    assert starts.tolist() == [0, 3, 5]
    assert lengths.tolist() == [3, 2, 3]  # the last 3 steps have no flag and are still a trajectory


def test_cut_trajectories_without_trailing_piece():
    terminals = np.array([0, 1, 0, 1], dtype=bool)
    starts, lengths = dt.cut_trajectories(terminals, np.zeros(4, dtype=bool))
    assert starts.tolist() == [0, 2] and lengths.tolist() == [2, 2]


def test_returns_to_go_is_undiscounted_suffix_sum_per_trajectory():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=50).astype(np.float32)
    lengths = np.array([1, 10, 4, 35])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    expected = np.concatenate([np.cumsum(rewards[s:s + n][::-1])[::-1] for s, n in zip(starts, lengths)])
    np.testing.assert_allclose(dt.returns_to_go(rewards, starts, lengths), expected, rtol=1e-5, atol=1e-5)


def test_prepare_data_statistics_scale_and_returns():
    rng = np.random.default_rng(1)
    n = 12
    raw = {
        "observations": rng.normal(3.0, 2.0, size=(n, 4)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        "rewards": np.arange(n, dtype=np.float32),
        "terminals": np.array([0, 0, 0, 1] + [0] * 8, dtype=bool),
        "timeouts": np.array([0] * 9 + [1, 0, 0], dtype=bool),
    }
    raw["observations"][:, 3] = 5.0  # a constant feature: std 0 must not divide by zero
    data = dt.prepare_data(raw, reward_scale=0.1)
    obs = raw["observations"].astype(np.float64)
    np.testing.assert_allclose(data.state_mean, obs.mean(0), rtol=1e-6)
    np.testing.assert_allclose(data.state_std, obs.std(0, ddof=0) + 1e-6, rtol=1e-6)  # population std
    assert not np.allclose(data.state_std[:3], obs.std(0, ddof=1)[:3] + 1e-6, rtol=1e-6)
    np.testing.assert_allclose(data.states, (obs - obs.mean(0)) / (obs.std(0) + 1e-6), rtol=1e-5, atol=1e-5)
    assert data.traj_lengths.tolist() == [4, 6, 2]
    assert data.traj_returns.tolist() == [0 + 1 + 2 + 3, sum(range(4, 10)), 10 + 11]
    np.testing.assert_allclose(data.returns_to_go[:4], [0.6, 0.6, 0.5, 0.3], rtol=1e-6)  # scaled by 0.1


def test_load_real_hopper_file(hopper_file):
    raw = dt.load_d4rl_hdf5(hopper_file)
    assert raw["observations"].shape[1] == 11 and raw["actions"].shape[1] == 3
    assert raw["observations"].dtype == np.float32 and raw["terminals"].dtype == bool
    starts, lengths = dt.cut_trajectories(raw["terminals"], raw["timeouts"])
    assert len(starts) == 9  # 8 episodes plus the trailing unflagged piece
    assert lengths[-1] == 7 and lengths.sum() == len(raw["rewards"])


@pytest.mark.parametrize("name, file", [
    ("hopper-medium-replay-v2", "hopper_medium_replay-v2.hdf5"),
    ("halfcheetah-medium-expert-v2", "halfcheetah_medium_expert-v2.hdf5"),
    ("walker2d-full-replay-v2", "walker2d_full_replay-v2.hdf5"),
    ("hopper-random-v2", "hopper_random-v2.hdf5"),
])
def test_d4rl_file_names(name, file):
    assert dt.d4rl_file_name(name) == file


def test_every_d4rl_locomotion_name_resolves(monkeypatch, tmp_path):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    assert len(dt.D4RL_NAMES) == 18
    for name in dt.D4RL_NAMES:
        source = dt.resolve_dataset(dt.TrainConfig(env_name=name))
        env = name.split("-")[0]
        assert source.eval_env == {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4"}[env]
        assert source.path == tmp_path / dt.d4rl_file_name(name)
        assert source.url == "https://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/" + dt.d4rl_file_name(name)
        assert (source.ref_min_score, source.ref_max_score) == D4RL_REFERENCES[env]


def test_dataset_dir_default_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("D4RL_DATASET_DIR", raising=False)
    config = dt.TrainConfig(env_name="hopper-medium-v2")
    assert dt.resolve_dataset(config).path == Path.home() / ".d4rl/datasets/hopper_medium-v2.hdf5"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "env"))
    assert dt.resolve_dataset(config).path == tmp_path / "env/hopper_medium-v2.hdf5"
    config.dataset_dir = str(tmp_path / "cfg")
    assert dt.resolve_dataset(config).path == tmp_path / "cfg/hopper_medium-v2.hdf5"


def test_unknown_name_suggests_closest():
    with pytest.raises(dt.UserError, match="hopper-medium-replay-v2"):
        dt.resolve_dataset(dt.TrainConfig(env_name="hoper-medium-replay-v2"))


def test_own_file_reference_scores_from_config_attrs_or_none(tmp_path, hopper_file):
    config = dt.TrainConfig(env_name="my-data", dataset_path=str(hopper_file), eval_env="Hopper-v4")
    source = dt.resolve_dataset(config)
    assert source.path == hopper_file and source.url is None
    assert source.ref_min_score is None and source.ref_max_score is None  # raw returns only
    config.ref_min_score, config.ref_max_score = 0.0, 10.0
    assert (dt.resolve_dataset(config).ref_min_score, dt.resolve_dataset(config).ref_max_score) == (0.0, 10.0)

    from conftest import write_d4rl_file
    tagged = tmp_path / "tagged.hdf5"
    write_d4rl_file(tagged, episodes=1, max_steps=5, attrs={"env_id": "Hopper-v4", "ref_min_score": -5.0, "ref_max_score": 50.0})
    source = dt.resolve_dataset(dt.TrainConfig(env_name="tagged", dataset_path=str(tagged)))
    assert (source.eval_env, source.ref_min_score, source.ref_max_score) == ("Hopper-v4", -5.0, 50.0)
    with pytest.raises(dt.UserError, match="eval_env"):
        dt.resolve_dataset(dt.TrainConfig(env_name="x", dataset_path=str(hopper_file)))


def test_own_file_missing_is_clear(tmp_path):
    with pytest.raises(dt.UserError, match="does not exist"):
        dt.resolve_dataset(dt.TrainConfig(dataset_path=str(tmp_path / "nope.hdf5"), eval_env="Hopper-v4"))


def test_load_rejects_missing_keys_and_mismatched_lengths(tmp_path):
    import h5py
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.zeros((5, 3), np.float32)
        f["actions"] = np.zeros((5, 2), np.float32)
        f["rewards"] = np.zeros(5, np.float32)
        f["terminals"] = np.zeros(5, bool)
    with pytest.raises(dt.UserError, match="timeouts"):
        dt.load_d4rl_hdf5(path)
    with h5py.File(path, "a") as f:
        f["timeouts"] = np.zeros(4, bool)
    with pytest.raises(dt.UserError, match="length"):
        dt.load_d4rl_hdf5(path)


@pytest.fixture()
def http_folder(tmp_path, monkeypatch):
    """A real HTTP server on loopback serving tmp_path/served."""
    # reached directly: urllib's global opener keeps the proxy of its first use (test_bad_input sets a dead one)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_writes_file_atomically(http_folder, tmp_path, hopper_file):
    served, url = http_folder
    (served / "hopper_medium-v2.hdf5").write_bytes(hopper_file.read_bytes())
    target = tmp_path / "datasets" / "hopper_medium-v2.hdf5"
    dt.download(f"{url}/hopper_medium-v2.hdf5", target)
    assert target.read_bytes() == hopper_file.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["hopper_medium-v2.hdf5"]  # no temp file left


def test_download_failure_names_path_and_url_and_leaves_nothing(http_folder, tmp_path):
    _, url = http_folder
    target = tmp_path / "datasets" / "walker2d_medium-v2.hdf5"
    with pytest.raises(dt.UserError) as err:
        dt.download(f"{url}/missing.hdf5", target)  # 404
    assert str(target) in str(err.value) and f"{url}/missing.hdf5" in str(err.value)
    assert list(target.parent.iterdir()) == []
