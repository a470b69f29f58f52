"""Evaluation speed: dt.evaluate() (every episode of every target in one batch) against the
one-episode-at-a-time rollout of the public baseline, on Hopper-v4 with the default-size model.

    python benchmarks/eval_speed.py                      # 100 episodes x 2 targets x 1000 steps
    python benchmarks/eval_speed.py --workers 0 2 4      # also compare env worker processes
    python benchmarks/eval_speed.py --device cuda --workers -1 --json figures.json   # GPU model, env workers
    python benchmarks/eval_speed.py --video 1            # and the cost of recording 1 episode per target

Prints figures, asserts nothing. The forward/env split of worker rollouts is the mean over the
workers, which run at the same time; their forward GFLOP/s is that of all workers together.
Every episode runs the full horizon: the envs are made with
`terminate_when_unhealthy=False`, so no episode ends early whatever the (untrained) model does; the
simulation and the forward pass cost the same per step as with a model that keeps the hopper alive.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
import dt  # noqa: E402
from flops import forward_flops, matmul_peak  # noqa: E402


def make_long_hopper(**kwargs) -> gym.Env:
    return dt.make_env("Hopper-v4", terminate_when_unhealthy=False, **kwargs)


@torch.no_grad()
def one_at_a_time(model: dt.DecisionTransformer, env: gym.Env, target: float, seed: int, reward_scale: float,
                  device: torch.device) -> int:
    """The public baseline's rollout: batch of one, full-sequence forward, history of the whole episode."""
    T, K = model.episode_len, model.seq_len
    states = torch.zeros(1, T + 1, model.state_dim, device=device)
    actions = torch.zeros(1, T, model.action_dim, device=device)
    returns = torch.zeros(1, T + 1, device=device)
    timesteps = torch.arange(T, device=device)[None]
    states[:, 0] = torch.as_tensor(env.reset(seed=seed)[0], device=device)
    returns[:, 0] = target * reward_scale
    for step in range(T):
        predicted = model(states[:, :step + 1][:, -K:], actions[:, :step + 1][:, -K:],
                          returns[:, :step + 1][:, -K:], timesteps[:, :step + 1][:, -K:])
        action = predicted[0, -1].cpu().numpy()
        obs, reward, terminated, truncated, _ = env.step(action)
        actions[:, step] = torch.as_tensor(action, device=device)
        states[:, step + 1] = torch.as_tensor(obs, device=device)
        returns[:, step + 1] = returns[:, step] - reward * reward_scale
        if terminated or truncated:
            return step + 1
    return T


def frame_cost(folder: str, frames: int = 300) -> Tuple[float, float]:
    """CPU seconds per recorded frame (this process and ffmpeg's): (env step + render, label + mp4 encoding)."""
    def cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system  # children: ffmpeg, counted once it exits

    env = dt.make_render_env(make_long_hopper)
    env.reset(seed=0)
    start, images = cpu(), []
    for _ in range(frames):
        env.step(env.action_space.sample())
        images.append(env.render())
    rendering = (cpu() - start) / frames
    env.close()
    start = cpu()
    with dt.EpisodeVideo(f"{folder}/cost.mp4", 3600.0, 125) as video:
        for i, image in enumerate(images):
            video.add(image, float(i))
    return rendering, (cpu() - start) / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=100, help="episodes per target")
    parser.add_argument("--targets", type=float, nargs="+", default=[3600.0, 1800.0])
    parser.add_argument("--horizon", type=int, default=1000, help="episode_len")
    parser.add_argument("--single_episodes", type=int, default=3, help="episodes timed on the one-at-a-time path")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, -1], help="eval_workers values to time")
    parser.add_argument("--step_workers", action="store_true",
                        help="with workers, also time the GPU's way on CPU: the model here, workers only step envs")
    parser.add_argument("--video", type=int, default=0,
                        help="also time each run recording this many episodes per target as mp4 (eval_video)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the figures to this JSON file (benchmarks/gpu_check.sh reads it)")
    args = parser.parse_args()
    try:
        device = dt.resolve_device(args.device)
    except dt.UserError as err:
        sys.exit(f"error: {err}")
    dt.keep_freed_memory()  # as dt.py's main() does
    torch.manual_seed(0)
    model = dt.DecisionTransformer(11, 3, episode_len=args.horizon).to(device).eval()  # default: E=128, 3 layers, K=20
    num = args.episodes * len(args.targets)
    mean, std = np.zeros(11, np.float32), np.ones(11, np.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch threads {torch.get_num_threads()}, Hopper-v4, {num} episodes x "
          f"{args.horizon} steps")
    # every episode runs the whole horizon: FLOPs of one episode's forward passes, context 1..K then K
    episode_flops = sum(forward_flops(model, 1, min(t + 1, model.seq_len), True) for t in range(args.horizon))

    def time_single() -> float:
        env, start, steps = make_long_hopper(), time.perf_counter(), 0
        for i in range(args.single_episodes):
            steps += one_at_a_time(model, env, args.targets[0], 42 + i, 0.001, device)
        rate = steps / (time.perf_counter() - start)
        print(f"one at a time: {steps} steps, {rate:.0f} episode-steps/s", flush=True)
        return rate

    single_rates = [time_single()]
    peak = matmul_peak(num * (3 * model.seq_len - 1), model.timestep_emb.embedding_dim, device)
    runs = [(w, None) for w in args.workers] + [(w, False) for w in args.workers if w and args.step_workers]
    if args.video:
        dt.check_video(make_long_hopper)  # as dt.py does before a run: MUJOCO_GL=egl, rendering works
    render = [t * args.episodes + i for t in range(len(args.targets)) for i in range(args.video)]
    rows, videos = [], tempfile.TemporaryDirectory()
    for workers, worker_rollouts in runs:
        for video in ((False, True) if args.video else (False,)):  # without, then with videos
            envs = dt.EvalEnvs(make_long_hopper, num, workers, render if video else ())
            timing = {"forward": 0.0, "env": 0.0}
            start = time.perf_counter()
            dt.evaluate(model, envs, tuple(args.targets), args.episodes, 42, mean, std, 0.001, device,
                        worker_rollouts, timing, video_prefix=f"{videos.name}/w{workers}" if video else None)
            total = time.perf_counter() - start
            envs.close()
            mode = "in-process" if envs.workers == 0 else \
                "workers step envs" if worker_rollouts is False or device.type != "cpu" else "worker rollouts"
            mode += f", {args.video} video{'s' if args.video > 1 else ''}/target" if video else ""
            overhead = f" ({total / rows[-1][-1] - 1:+.0%} wall time with the videos)" if video else ""
            rows.append((workers, envs.workers, mode, num * args.horizon / total, timing["forward"] / total,
                         timing["env"] / total, num * episode_flops / timing["forward"], total))
            print(f"batched, eval_workers={workers} ({mode}): {num * args.horizon} steps in {total:.1f} s{overhead}",
                  flush=True)
    single_rates.append(time_single())  # again: the machine's speed drifts
    if args.video:
        rendering, encoding = frame_cost(videos.name)
        print(f"\nCPU per recorded frame: {rendering * 1e3:.1f} ms env step + render, {encoding * 1e3:.1f} ms label + "
              f"encode; {len(render)} videos x {args.horizon} frames = {len(render) * args.horizon * (rendering + encoding):.1f} "
              "s of CPU per evaluation")
    single_rate = float(np.mean(single_rates))

    print(f"\nmatmul peak ({num * (3 * model.seq_len - 1)}x128 @ 128x512, fp32): {peak / 1e9:.1f} GFLOP/s")
    print(f"one at a time (mean of the runs before and after): {single_rate:.0f} episode-steps/s")
    print("| eval_workers | evaluation | batched episode-steps/s | one-at-a-time episode-steps/s | ratio | forward "
          "| env step | other | forward GFLOP/s (% of matmul peak) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workers, used, mode, rate, fwd, env_share, flops, _ in rows:
        label = f"{workers} (= {used})" if workers == -1 else str(workers)
        print(f"| {label} | {mode} | {rate:.0f} | {single_rate:.0f} | {rate / single_rate:.1f}x | {fwd:.0%} | "
              f"{env_share:.0%} | {max(0.0, 1 - fwd - env_share):.0%} | {flops / 1e9:.1f} ({flops / peak:.0%}) |")
    if args.json:
        figures = {"device": str(device), "device_name": name, "episodes": num, "horizon": args.horizon,
                   "one_at_a_time_steps_per_s": single_rate, "rows": [
                       {"eval_workers": workers, "workers": used, "mode": mode, "steps_per_s": rate,
                        "ratio": rate / single_rate, "forward": fwd, "env": env_share, "forward_gflops": flops / 1e9}
                       for workers, used, mode, rate, fwd, env_share, flops, _ in rows]}
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
