"""Make D4RL-style offline datasets for any gymnasium continuous-control env.

The D4RL recipe: train a SAC behaviour policy, keep its checkpoints, then write
  random         uniform random actions
  medium         rollouts of the first checkpoint that reaches about a third of expert return
  expert         rollouts of the best checkpoint
  medium_replay  SAC's replay buffer up to the medium checkpoint (every transition it collected)
  medium_expert  medium + expert, concatenated
as HDF5 files with D4RL's keys, dtypes and terminal/timeout semantics, plus attributes (env id,
reference scores, behaviour-policy return) that algorithms/dt.py reads, so a config only needs
`dataset_path`.

    python benchmarks/make_dataset.py --env Hopper-v4 --work_dir work/hopper --train_steps 300000 \\
        --kinds medium_replay medium expert --out_dir data

Everything is resumable: re-running continues SAC from its latest checkpoint (with its replay buffer)
and skips dataset files that already exist. Needs stable-baselines3 (requirements-dev.txt).
"""
import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
from dt import D4RL_ENVS, D4RL_REF_SCORES, atomic_write, cut_trajectories, make_env  # noqa: E402

try:
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("error: this tool needs stable-baselines3: pip install -r requirements-dev.txt")

KINDS = ("random", "medium", "expert", "medium_replay", "medium_expert")


# ----------------------------------------------------------------------------------------------
# Behaviour policy: SAC with checkpoints every `checkpoint_every` steps
# ----------------------------------------------------------------------------------------------
def policy_return(policy: Callable[[np.ndarray], np.ndarray], env_id: str, episodes: int, seed: int) -> float:
    """Mean undiscounted return of `policy` over `episodes` episodes (seeds seed, seed+1, ...)."""
    env = make_env(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns))


class Checkpointer(BaseCallback):
    """Saves policy + replay buffer every `every` steps and records the checkpoint's eval return."""

    def __init__(self, work_dir: Path, every: int, eval_episodes: int, seed: int, progress: Dict[str, Any],
                 bar: tqdm):
        super().__init__()
        self.work_dir, self.every, self.eval_episodes, self.seed = work_dir, every, eval_episodes, seed
        self.progress, self.bar = progress, bar

    def _on_step(self) -> bool:
        self.bar.update(1)
        if self.num_timesteps % self.every == 0:
            save_checkpoint(self.model, self.work_dir, self.num_timesteps, self.eval_episodes, self.seed,
                            self.progress)
            last = self.progress["checkpoints"][-1]
            self.bar.set_postfix(eval_return=f"{last['eval_return']:.0f}")
        return True


def save_checkpoint(model: "SAC", work_dir: Path, step: int, eval_episodes: int, seed: int,
                    progress: Dict[str, Any]) -> None:
    # Order matters for resume: files named by step first, progress.json (the commit point) last.
    atomic_write(work_dir / f"sac_{step}.zip", lambda p: _save_to(p, model.save))
    atomic_write(work_dir / f"replay_{step}.pkl", lambda p: _save_to(p, model.save_replay_buffer))
    deterministic = lambda obs: model.predict(obs, deterministic=True)[0]  # noqa: E731
    ret = policy_return(deterministic, progress["env_id"], eval_episodes, seed + 10_000)
    progress["checkpoints"].append({"step": step, "eval_return": ret})
    atomic_write(work_dir / "progress.json", lambda p: p.write_text(json.dumps(progress, indent=1)))
    for old in work_dir.glob("replay_*.pkl"):  # only the latest buffer is needed (it holds all earlier data)
        if old.name != f"replay_{step}.pkl":
            old.unlink()


def _save_to(path: Path, save: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:  # a file object: SB3 would otherwise append its own suffix
        save(f)


def train_behaviour_policy(env_id: str, work_dir: Path, train_steps: int, checkpoint_every: int,
                           eval_episodes: int, seed: int) -> Dict[str, Any]:
    """Train SAC (stable-baselines3 defaults) up to `train_steps`, resuming from the latest checkpoint."""
    work_dir.mkdir(parents=True, exist_ok=True)
    progress_path = work_dir / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {
        "env_id": env_id, "seed": seed, "checkpoints": []}
    if progress["env_id"] != env_id:
        sys.exit(f"error: {work_dir} holds a policy for {progress['env_id']}, not {env_id}; use another --work_dir")
    done = progress["checkpoints"][-1]["step"] if progress["checkpoints"] else 0
    if done >= train_steps:
        return progress
    env = make_env(env_id)
    if done:  # resume: policy, optimizer and replay buffer of the latest committed checkpoint
        model = SAC.load(work_dir / f"sac_{done}.zip", env=env, device="cpu")
        model.load_replay_buffer(work_dir / f"replay_{done}.pkl")
        buffer = model.replay_buffer
        # The episode that was running when the checkpoint was written is lost: mark it cut by time.
        buffer.timeouts[buffer.pos - 1] = 1.0
        buffer.dones[buffer.pos - 1] = 1.0
    else:
        # Buffer sized to the whole run, so it never wraps and stays in collection order.
        model = SAC("MlpPolicy", env, buffer_size=train_steps, seed=seed, device="cpu", verbose=0)
    model.set_random_seed(seed + done)
    with tqdm(total=train_steps, initial=done, desc=f"SAC {env_id}", unit="step") as bar:
        callback = Checkpointer(work_dir, checkpoint_every, eval_episodes, seed, progress, bar)
        model.learn(train_steps - done, callback=callback, reset_num_timesteps=not done)
    env.close()
    return progress


def replay_transitions(work_dir: Path, progress: Dict[str, Any], upto_step: int) -> Dict[str, np.ndarray]:
    """The first `upto_step` transitions SAC collected, in D4RL layout."""
    from stable_baselines3.common.save_util import load_from_pkl

    buffer = load_from_pkl(work_dir / f"replay_{progress['checkpoints'][-1]['step']}.pkl")
    n = min(upto_step, buffer.pos if not buffer.full else buffer.buffer_size)
    timeouts = buffer.timeouts[:n, 0].astype(bool)
    data = {
        "observations": buffer.observations[:n, 0].astype(np.float32),
        "next_observations": buffer.next_observations[:n, 0].astype(np.float32),
        "actions": buffer.actions[:n, 0].astype(np.float32),
        "rewards": buffer.rewards[:n, 0].astype(np.float32),
        "terminals": buffer.dones[:n, 0].astype(bool) & ~timeouts,  # SB3 'dones' include time-limit ends
        "timeouts": timeouts,
    }
    data["timeouts"][-1] |= not data["terminals"][-1]  # the episode running at the cut ends there
    return data


# ----------------------------------------------------------------------------------------------
# Collection
# ----------------------------------------------------------------------------------------------
def collect(policy: Callable[[np.ndarray], np.ndarray], env_id: str, samples: int, seed: int,
            desc: str) -> Dict[str, np.ndarray]:
    """Roll out `policy` for exactly `samples` transitions with D4RL semantics:
    terminals = the env terminated (the agent fell), timeouts = the time limit (or the sample budget) cut it."""
    env = make_env(env_id)
    columns: Dict[str, List[np.ndarray]] = {k: [] for k in
                                           ("observations", "next_observations", "actions", "rewards",
                                            "terminals", "timeouts")}
    obs, _ = env.reset(seed=seed)
    episode = 0
    for t in tqdm(range(samples), desc=desc, unit="step"):
        action = np.clip(policy(obs), env.action_space.low, env.action_space.high)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        truncated = truncated or t == samples - 1
        for key, value in zip(columns, (obs, next_obs, action, reward, terminated, truncated and not terminated)):
            columns[key].append(np.asarray(value))
        obs = next_obs
        if terminated or truncated:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
    env.close()
    dtypes = {"terminals": bool, "timeouts": bool}
    return {k: np.stack(v).astype(dtypes.get(k, np.float32)) for k, v in columns.items()}


def episode_returns(data: Dict[str, np.ndarray]) -> np.ndarray:
    starts, lengths = cut_trajectories(data["terminals"], data["timeouts"])
    return np.add.reduceat(data["rewards"].astype(np.float64), starts)


def write_d4rl_file(path: Path, data: Dict[str, np.ndarray], attrs: Dict[str, Any]) -> None:
    """D4RL keys and dtypes (float32 arrays, bool flags), gzip-compressed, written atomically."""
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for key, value in data.items():
                f.create_dataset(key, data=value, compression="gzip", shuffle=True)
            for key, value in attrs.items():
                f.attrs[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def reference_scores(env_id: str, random_return: Callable[[], float], expert_return: float) -> Dict[str, float]:
    """D4RL's reference scores for the D4RL envs (scores comparable with the papers); otherwise a
    uniform-random policy's return (0) and the best SAC checkpoint's return (100)."""
    for family, d4rl_env in D4RL_ENVS.items():
        if d4rl_env == env_id:
            ref_min, ref_max = D4RL_REF_SCORES[family]
            return {"ref_min_score": ref_min, "ref_max_score": ref_max}
    return {"ref_min_score": random_return(), "ref_max_score": expert_return}


def make_datasets(args: argparse.Namespace) -> List[Path]:
    work_dir, out_dir = Path(args.work_dir), Path(args.out_dir)
    torch.set_num_threads(args.threads)
    progress = train_behaviour_policy(args.env, work_dir, args.train_steps, args.checkpoint_every,
                                      args.eval_episodes, args.seed)
    checkpoints = progress["checkpoints"]
    if not checkpoints:
        sys.exit("error: no SAC checkpoint yet; --train_steps must be at least --checkpoint_every")
    uniform = make_env(args.env).action_space
    uniform.seed(args.seed)
    best = max(checkpoints, key=lambda c: c["eval_return"])
    refs = reference_scores(args.env, lambda: policy_return(
        lambda obs: uniform.sample(), args.env, args.eval_episodes, args.seed), best["eval_return"])
    medium_return = args.medium_return if args.medium_return is not None else refs["ref_max_score"] / 3
    medium = next((c for c in checkpoints if c["eval_return"] >= medium_return), None)
    if medium is None and {"medium", "medium_replay", "medium_expert"} & set(args.kinds):
        sys.exit(f"error: no checkpoint reached the medium return {medium_return:.0f} (best: "
                 f"{best['eval_return']:.0f} at step {best['step']}); train longer (--train_steps) "
                 "or lower --medium_return")
    prefix = args.name or args.env.split("-")[0].lower()
    written = []
    for kind in args.kinds:
        path = out_dir / f"{prefix}_{kind}.hdf5"
        if path.exists():
            print(f"{path} exists, skipping")
            written.append(path)
            continue
        policies = {"medium": medium, "expert": best}
        if kind == "random":
            data, source = collect(lambda obs: uniform.sample(), args.env, args.samples, args.seed, kind), None
        elif kind in policies:
            source = policies[kind]
            model = SAC.load(work_dir / f"sac_{source['step']}.zip", device="cpu")
            model.set_random_seed(args.seed)
            # stochastic actions, as D4RL collected them (it stores their log-probabilities)
            data = collect(lambda obs: model.predict(obs, deterministic=False)[0], args.env, args.samples,
                           args.seed + (1 if kind == "expert" else 2), kind)
        elif kind == "medium_replay":
            data, source = replay_transitions(work_dir, progress, medium["step"]), medium
        else:  # medium_expert: both files concatenated, as in D4RL
            parts = [h5py.File(out_dir / f"{prefix}_{k}.hdf5", "r") for k in ("medium", "expert")]
            data = {key: np.concatenate([p[key][()] for p in parts]) for key in parts[0].keys()}
            for p in parts:
                p.close()
            source = None
        returns = episode_returns(data)
        attrs = {
            "env_id": args.env, **refs, "kind": kind,
            "behavior_policy_step": source["step"] if source else -1,
            "behavior_policy_return": source["eval_return"] if source else float("nan"),
            "dataset_mean_return": float(returns.mean()), "dataset_episodes": len(returns),
            "command": shlex.join([sys.executable, *sys.argv]),
        }
        write_d4rl_file(path, data, attrs)
        print(f"{path}: {len(data['rewards'])} transitions, {len(returns)} episodes, "
              f"mean return {returns.mean():.1f} (min {returns.min():.1f}, max {returns.max():.1f})")
        written.append(path)
    return written


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True, help="gymnasium env id with Box actions, e.g. Hopper-v4")
    parser.add_argument("--work_dir", required=True, help="SAC checkpoints, replay buffer and progress.json")
    parser.add_argument("--out_dir", default="data", help="where the HDF5 files go")
    parser.add_argument("--name", default=None, help="file prefix (default: the env's name, e.g. hopper)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                        help="medium_expert needs medium and expert earlier in the list or on disk")
    parser.add_argument("--train_steps", type=int, default=1_000_000, help="SAC env steps")
    parser.add_argument("--checkpoint_every", type=int, default=10_000)
    parser.add_argument("--eval_episodes", type=int, default=5, help="episodes to score each checkpoint")
    parser.add_argument("--medium_return", type=float, default=None,
                        help="return that makes a checkpoint 'medium' (default: ref_max_score / 3)")
    parser.add_argument("--samples", type=int, default=1_000_000, help="transitions per collected dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for SAC")
    args = parser.parse_args(argv)
    if args.checkpoint_every <= 0 or args.train_steps <= 0 or args.samples <= 0:
        parser.error("--train_steps, --checkpoint_every and --samples must be positive")
    return args


if __name__ == "__main__":
    make_datasets(parse_args())
