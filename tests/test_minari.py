"""Minari datasets: N+1 alignment, cutting, dict flattening, eval env and scores, the D4RL ports, configs, CLI.

The datasets are written here with minari.create_dataset_from_buffers from real gymnasium(-robotics) rollouts,
under a temporary MINARI_DATASETS_PATH: nothing is downloaded.
"""
import json
import os
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pyrallis
import pytest
import torch

import dt
from conftest import ROOT

minari = pytest.importorskip("minari")
pytest.importorskip("gymnasium_robotics")
from minari.data_collector import EpisodeBuffer  # noqa: E402

warnings.filterwarnings("ignore", message=".*is out of date.*")


def rollout(env: gym.Env, seed: int, steps: int, end: str) -> dict:
    """One episode of random actions in Minari's layout (steps + 1 observations), ending with the flag `end`
    ("terminated", "truncated" or "none"); also returns the observation each action was taken in."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    observations, taken_in, actions, rewards = [obs], [], [], []
    for _ in range(steps):
        action = env.action_space.sample()
        taken_in.append(obs)
        obs, reward, terminated, _, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
        if terminated:
            break
    n = len(actions)
    stack = (lambda xs: {k: np.array([x[k] for x in xs]) for k in xs[0]}) if isinstance(obs, dict) else np.array
    terminations, truncations = np.zeros(n, bool), np.zeros(n, bool)
    terminations[-1], truncations[-1] = end == "terminated", end == "truncated"
    buffer = EpisodeBuffer(observations=stack(observations), actions=np.array(actions), rewards=np.array(rewards),
                           terminations=terminations, truncations=truncations)
    return {"buffer": buffer, "taken_in": stack(taken_in), "actions": np.array(actions, np.float32),
            "rewards": np.array(rewards, np.float32), "terminal": end == "terminated"}


ENDS = ("terminated", "truncated", "none", "truncated")
META = dict(author="tests", author_email="tests@example.invalid", code_permalink="tests/test_minari.py",
            algorithm_name="random actions", description="test data")  # Minari warns when these are missing


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory):
    """Three local Minari datasets: Box observations (Hopper-v5), dict observations (PointMaze) and a
    stand-in for the antmaze port (AntMaze under the port's id, to check the port's eval env and scores)."""
    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        hopper = gym.make("Hopper-v5", max_episode_steps=15)  # short eval episodes for the CLI test
        episodes = [rollout(hopper, seed, 12, end) for seed, end in enumerate(ENDS)]
        minari.create_dataset_from_buffers("test/hopper/random-v0", [e["buffer"] for e in episodes], env=hopper,
                                           eval_env=hopper, ref_min_score=-20.0, ref_max_score=380.0, **META)
        maze = gym.make("PointMaze_UMaze-v3", continuing_task=True, reset_target=False, max_episode_steps=12)
        maze_episodes = [rollout(maze, seed, 10, end) for seed, end in enumerate(ENDS)]
        minari.create_dataset_from_buffers("test/pointmaze/random-v0", [e["buffer"] for e in maze_episodes],
                                           env=maze, eval_env=maze, ref_min_score=0.0, ref_max_score=12.0, **META)
        ant = gym.make("AntMaze_UMaze-v4", continuing_task=True, reset_target=False, max_episode_steps=700)
        ant_episodes = [rollout(ant, seed, 8, "truncated") for seed in range(2)]
        minari.create_dataset_from_buffers("D4RL/antmaze/umaze-v1", [e["buffer"] for e in ant_episodes], env=ant,
                                           eval_env=ant, ref_min_score=0.0, ref_max_score=400.0, **META)
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
    return root, episodes, maze_episodes


def load(env_name, root, monkeypatch, **fields):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    config = dt.TrainConfig(env_name=env_name, **fields)
    return dt.load_minari(dt.resolve_dataset(config), recover_env=config.eval_env is None)


def test_each_action_is_paired_with_the_observation_it_was_taken_in(minari_root, monkeypatch):
    root, episodes, _ = minari_root
    source, raw = load("test/hopper/random-v0", root, monkeypatch)
    # taken_in[t] is obs[t], never obs[t+1]: a one-step shift of observations against actions fails here
    np.testing.assert_array_equal(raw["observations"], np.concatenate([e["taken_in"] for e in episodes]).astype(np.float32))
    np.testing.assert_array_equal(raw["actions"], np.concatenate([e["actions"] for e in episodes]))
    np.testing.assert_array_equal(raw["rewards"], np.concatenate([e["rewards"] for e in episodes]))
    assert raw["observations"].dtype == np.float32 and raw["observations"].shape[1] == 11
    assert not np.array_equal(raw["observations"][1:], raw["observations"][:-1])  # the check above can tell a shift


def test_episodes_are_cut_at_their_ends_flagged_or_not(minari_root, monkeypatch):
    root, episodes, _ = minari_root
    _, raw = load("test/hopper/random-v0", root, monkeypatch)
    starts, lengths = dt.cut_trajectories(raw["terminals"], raw["timeouts"])
    assert lengths.tolist() == [len(e["actions"]) for e in episodes]  # the unflagged episode ("none") too
    ends = starts + lengths - 1
    assert raw["terminals"][ends].tolist() == [e["terminal"] for e in episodes]
    assert (raw["terminals"] | raw["timeouts"]).sum() == len(episodes)  # flags on the last steps only
    assert not (raw["terminals"] & raw["timeouts"]).any()


def test_dict_observations_flatten_in_the_documented_order(minari_root, monkeypatch):
    root, _, maze_episodes = minari_root
    _, raw = load("test/pointmaze/random-v0", root, monkeypatch)
    taken_in = {k: np.concatenate([e["taken_in"][k] for e in maze_episodes]) for k in dt.OBS_KEY_ORDER}
    assert raw["observations"].shape[1] == 4 + 2 + 2
    np.testing.assert_array_equal(raw["observations"][:, 0:4], taken_in["observation"].astype(np.float32))
    np.testing.assert_array_equal(raw["observations"][:, 4:6], taken_in["achieved_goal"].astype(np.float32))
    np.testing.assert_array_equal(raw["observations"][:, 6:8], taken_in["desired_goal"].astype(np.float32))
    # the eval env flattens the same way (gymnasium's own Dict order would be achieved, desired, observation)
    plain, flat = gym.make("PointMaze_UMaze-v3"), dt.make_env("PointMaze_UMaze-v3")
    obs, flat_obs = plain.reset(seed=3)[0], flat.reset(seed=3)[0]
    assert flat.observation_space.shape == (8,) and flat_obs.dtype == np.float32
    np.testing.assert_array_equal(flat_obs, np.concatenate([obs[k] for k in dt.OBS_KEY_ORDER]).astype(np.float32))
    assert dt.obs_keys(["desired_goal", "zeta", "observation", "alpha"]) == ["observation", "desired_goal", "alpha", "zeta"]


def test_eval_env_and_normalized_score_come_from_the_dataset(minari_root, monkeypatch):
    root, _, _ = minari_root
    source, _ = load("test/pointmaze/random-v0", root, monkeypatch)
    dataset = minari.load_dataset("test/pointmaze/random-v0")
    assert source.env_spec == dataset.recover_environment(eval_env=True).spec and source.eval_env == "PointMaze_UMaze-v3"
    env = dt.make_env(source.env_spec)
    assert env.spec.max_episode_steps == 12 and env.unwrapped.continuing_task  # the dataset's own eval env
    returns = np.array([0.0, 3.0, 12.0])
    episodes = np.array([(r, 12, False) for r in returns], dtype=dt.EPISODE)
    metrics = dt.eval_metrics({1.0: episodes}, source.ref_min_score, source.ref_max_score)
    expected = 100 * minari.get_normalized_score(dataset, returns)
    assert metrics["eval/1.0_normalized_score_mean"] == pytest.approx(expected.mean())
    assert metrics["eval/1.0_normalized_score_std"] == pytest.approx(expected.std())
    source, _ = load("test/pointmaze/random-v0", root, monkeypatch, ref_min_score=1.0, ref_max_score=2.0, eval_env="Hopper-v5")
    assert (source.ref_min_score, source.ref_max_score, source.env_spec, source.eval_env) == (1.0, 2.0, None, "Hopper-v5")


def test_antmaze_port_is_evaluated_episodically_with_d4rl_scores(minari_root, monkeypatch):
    root, _, _ = minari_root
    source, raw = load("antmaze-umaze-v2", root, monkeypatch)  # the D4RL name reads the local port, offline
    assert source.minari_id == "D4RL/antmaze/umaze-v1" and raw["observations"].shape[1] == 27 + 2 + 2
    assert (source.ref_min_score, source.ref_max_score) == (0.0, 1.0)  # not the dataset's 0/400: success rate
    env = dt.make_env(source.env_spec)
    assert source.eval_env == "AntMaze_UMaze-v4" and not env.unwrapped.continuing_task  # ends at the goal, as D4RL
    assert env.spec.kwargs["maze_map"] == gym.make("AntMaze_UMaze-v4").spec.kwargs["maze_map"]  # the rest kept


def test_names_resolve_to_ports_and_envs_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    assert len(dt.D4RL_TO_MINARI) == 21 and set(dt.D4RL_TO_MINARI.values()) == set(dt.MINARI_PORTS)
    cases = {"maze2d-large-v1": ("D4RL/pointmaze/large-v2", "PointMaze_Large-v3", None),
             "antmaze-medium-diverse-v2": ("D4RL/antmaze/medium-diverse-v1", "AntMaze_Medium_Diverse_GR-v4", 0.0),
             "pen-cloned-v1": ("D4RL/pen/cloned-v2", "AdroitHandPen-v1", 96.262799),
             "mujoco/walker2d/simple-v0": ("mujoco/walker2d/simple-v0", "Walker2d-v5", None),
             "someone/own/data-v3": ("someone/own/data-v3", None, None)}
    for name, (dataset_id, env_id, ref_min) in cases.items():
        source = dt.resolve_dataset(dt.TrainConfig(env_name=name))
        assert (source.minari_id, source.eval_env, source.ref_min_score) == (dataset_id, env_id, ref_min)
        assert source.path == tmp_path / dataset_id and source.url is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(dt.UserError, match="antmaze-umaze-diverse-v2"):
        dt.resolve_dataset(dt.TrainConfig(env_name="antmaze-umaze-divers-v2"))


# hyperparameters of the public baseline's configs (dt-algorithm.md): batch, lr, eval_every, reward_scale, targets
BASELINE = {"maze2d": (4096, 8e-4, 5000, 1.0, (280.0, 140.0)), "antmaze": (64, 1e-4, 10000, 1.0, (1.0, 0.5)),
            "pen": (4096, 8e-4, 5000, 1.0, (3100.0, 1550.0)), "door": (4096, 8e-4, 5000, 1.0, (2900.0, 1450.0)),
            "hammer": (4096, 8e-4, 5000, 1.0, (12800.0, 6400.0)), "relocate": (4096, 8e-4, 5000, 1.0, (4300.0, 2150.0)),
            "hopper": (4096, 8e-4, 5000, 0.001, (3600.0, 1800.0)), "walker2d": (4096, 8e-4, 5000, 0.001, (5000.0, 2500.0)),
            "halfcheetah": (4096, 8e-4, 5000, 0.001, (12000.0, 6000.0))}
DIVERSE_TARGETS = (1.0, 0.5, 0.25, 0.125, 0.06, 0.03)
# (state size as flattened here, action size) of each family's env
SIZES = {"maze2d": (8, 2), "antmaze": (31, 8), "pen": (45, 24), "door": (39, 28), "hammer": (46, 26),
         "relocate": (39, 30), "hopper": (11, 3), "walker2d": (17, 6), "halfcheetah": (17, 6)}
MINARI_CONFIGS = [p for p in sorted((ROOT / "configs").rglob("*.yaml"))
                  if p.parent.name not in ("hopper", "halfcheetah", "walker2d") or p.parent.parent.name == "mujoco"]
MINARI_CONFIGS = [p for p in MINARI_CONFIGS if p != ROOT / "configs/dt/quickstart.yaml"  # bundled data, not Minari
                  and p.parent.name != "paper"]  # the DT authors' locomotion presets


@pytest.mark.parametrize("path", MINARI_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_minari_config_loads_and_its_env_constructs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    config = pyrallis.load(dt.TrainConfig, path.open())  # what --config_path does, without building the CLI parser
    dt.validate_config(config)
    source = dt.resolve_dataset(config)
    family = source.minari_id.split("/")[1].replace("pointmaze", "maze2d")
    env = dt.make_env(source.eval_env)
    assert (env.observation_space.shape[0], env.action_space.shape[0]) == SIZES[family]
    env.close()
    batch, lr, every, scale, targets = BASELINE[family]
    targets = DIVERSE_TARGETS if "diverse" in config.env_name else targets
    assert (config.batch_size, config.learning_rate, config.eval_every, config.reward_scale) == (batch, lr, every, scale)
    assert config.target_returns == targets and config.update_steps == 100_000 and config.episode_len == 1000
    name = config.env_name.split("/")[-1] if "/" in config.env_name else config.env_name.split("-", 1)[1]
    assert path.stem == name.replace("-", "_")  # configs/dt/antmaze/umaze_diverse_v2.yaml, configs/dt/mujoco/hopper/medium_v0.yaml


def test_every_dataset_of_the_baseline_and_minari_mujoco_has_a_config():
    names = {pyrallis.load(dt.TrainConfig, p.open()).env_name for p in MINARI_CONFIGS}
    assert names == set(dt.D4RL_TO_MINARI) | set(dt.MINARI_MUJOCO_NAMES)
    assert len(names) + 9 == 39  # with the 9 D4RL locomotion configs: the baseline's 30 and 9 Minari mujoco ones


def run_dt(args, root, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="disabled", MINARI_DATASETS_PATH=str(root), HF_HUB_OFFLINE="1", HOME=str(cwd / "home"),
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")  # no network
    return subprocess.run([sys.executable, str(ROOT / "algorithms/dt.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_and_evaluates_in_the_recovered_env(minari_root, tmp_path):
    root, _, _ = minari_root
    args = ["--env_name", "test/pointmaze/random-v0", "--update_steps", "4", "--eval_every", "4", "--log_every", "2",
            "--batch_size", "8", "--eval_episodes", "2", "--target_returns", "[12,6]", "--seq_len", "5",
            "--embedding_dim", "16", "--num_layers", "1", "--warmup_steps", "2", "--reward_scale", "1.0",
            "--device", "cpu", "--eval_workers", "1", "--runs_dir", "runs"]  # one worker process: the env must pickle
    result = run_dt(args, root, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("DT-test-pointmaze-random-v0-seed10-")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r for r in rows if "train_loss" not in r]
    assert evaluation["step"] == 4 and 0.0 <= evaluation["eval/12.0_return_mean"] <= 12.0  # 12-step episodes
    assert evaluation["eval/12.0_normalized_score_mean"] == pytest.approx(100 * evaluation["eval/12.0_return_mean"] / 12.0)
    assert "eval env PointMaze_UMaze-v3" in result.stdout
    # eval-only evaluates in the same recovered env (its spec travels in the checkpoint): the same row again
    spec = torch.load(run_dir / "latest.pt", weights_only=False)["eval_env_spec"]
    assert spec.id == "PointMaze_UMaze-v3" and spec.max_episode_steps == 12  # the dataset's, not the registry's
    result = run_dt(["--eval_checkpoint", str(run_dir), "--eval_workers", "1", "--runs_dir", "evals"], root, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_dir,) = (tmp_path / "evals").iterdir()
    assert eval_dir.name.startswith("DT-eval-test-pointmaze-random-v0-")
    assert [json.loads(line) for line in (eval_dir / "metrics.jsonl").read_text().splitlines()] == [evaluation]


def test_cli_missing_dataset_without_network_is_one_line(minari_root, tmp_path):
    root = tmp_path / "datasets"
    result = run_dt(["--env_name", "mujoco/hopper/medum-v0", "--device", "cpu"], root, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "mujoco/hopper/medium-v0" in lines[0] and str(root / "mujoco/hopper/medum-v0") in lines[0]
    assert not (root / "mujoco" / "hopper" / "medum-v0").exists()  # nothing half-downloaded left
