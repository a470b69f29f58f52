"""Training speed of algorithms/dt.py: dataset load time, updates per second, where the time goes, MFU.

    python benchmarks/train_speed.py                           # batch 64 and 4096 on the default device
    python benchmarks/train_speed.py --batch_sizes 4096 --bf16 --compile --device cuda --json figures.json

Prints figures, asserts nothing. MFU = model FLOPs per update (counted analytically, printed) x updates
per second / peak, where peak is the best rate this script measures for a plain matmul of the model's MLP
shape, (tokens x E) @ (E x 4E), in the training dtype, at the same thread count. A profile of a few
updates per batch size shows which ops take the time, and on CPU the MFU the matmuls alone would allow.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
import dt  # noqa: E402
from flops import matmul_peak, sync, update_flops  # noqa: E402


def write_synthetic_d4rl(path: Path, transitions: int, state_dim: int = 17, action_dim: int = 6) -> None:
    """A D4RL-layout file of the given size: 1000-step trajectories ending in timeouts, a few terminals."""
    rng = np.random.default_rng(0)
    timeouts = np.zeros(transitions, bool)
    timeouts[999::1000] = True
    terminals = np.zeros(transitions, bool)
    terminals[rng.choice(transitions, transitions // 5000, replace=False)] = True
    timeouts &= ~terminals
    with h5py.File(path, "w") as f:
        f["observations"] = rng.standard_normal((transitions, state_dim), dtype=np.float32)
        f["next_observations"] = rng.standard_normal((transitions, state_dim), dtype=np.float32)
        f["actions"] = rng.uniform(-1, 1, (transitions, action_dim)).astype(np.float32)
        f["rewards"] = rng.standard_normal(transitions, dtype=np.float32)
        f["terminals"] = terminals
        f["timeouts"] = timeouts


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def time_updates(config: dt.TrainConfig, data: dt.OfflineData, device: torch.device, updates: int, warmup: int,
                 profile_updates: int = 0):
    """Seconds per update for sampling, forward+backward and optimizer, using dt.py's own pieces.

    profile_updates > 0: afterwards, profile that many updates and print where the time goes; returns
    the matmul ops' seconds per update too (CPU; None on GPU).
    """
    sampler = dt.WindowSampler(data, config.seq_len, device, seed=0)
    model, optimizer, scheduler = dt.build_training(config, data.states.shape[1], data.actions.shape[1], device)
    train_model = torch.compile(model) if config.compile else model
    micro_batch = config.micro_batch or (config.batch_size if device.type == "cuda" else 64)
    totals = np.zeros(3)

    def update():
        optimizer.zero_grad(set_to_none=True)
        dt.forward_backward(train_model, sampler.sample(config.batch_size), micro_batch, config.bf16 and device.type == "cuda")
        dt.optimizer_step(model, optimizer, scheduler, config.clip_grad)

    for i in range(warmup + updates):
        marks = [time.perf_counter()]
        batch = sampler.sample(config.batch_size)
        sync(device)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        dt.forward_backward(train_model, batch, micro_batch, config.bf16 and device.type == "cuda")
        sync(device)
        marks.append(time.perf_counter())
        dt.optimizer_step(model, optimizer, scheduler, config.clip_grad)
        sync(device)
        marks.append(time.perf_counter())
        if i >= warmup:
            totals += np.diff(marks)
    matmul_seconds = None
    if profile_updates:
        activities = [torch.profiler.ProfilerActivity.CPU] + \
            ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(profile_updates):
                update()
            sync(device)
        events = prof.key_averages()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in events)
        print(f"\nprofile of {profile_updates} updates at batch {config.batch_size} ({key}), top ops:")
        for e in sorted(events, key=lambda e: -getattr(e, key))[:12]:
            print(f"  {e.key[:60]:60s} {getattr(e, key) / total:6.1%}")
        if device.type == "cpu":
            matmul_seconds = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6 / profile_updates
            print(f"  matmul ops ({', '.join(MATMUL_OPS)}): "
                  f"{sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total:.1%} of the time")
    return model, totals / updates, matmul_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--updates", type=int, nargs="+", default=[40, 3], help="timed updates per batch size")
    parser.add_argument("--transitions", type=int, default=2_000_000, help="size of the synthetic dataset")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--tf32", action="store_true", help="TF32 tensor cores for float32 matmuls (CUDA): dt.py's tf32")
    parser.add_argument("--micro_batch", type=int, default=0, help="0: dt.py's automatic choice")
    parser.add_argument("--profile", type=int, default=5, help="updates profiled per batch size (0: none)")
    parser.add_argument("--json", help="also write the figures to this JSON file (benchmarks/gpu_check.sh reads it)")
    args = parser.parse_args()
    try:
        device = dt.resolve_device(args.device)
    except dt.UserError as err:
        sys.exit(f"error: {err}")
    dt.keep_freed_memory()  # as dt.py's main() does
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # as dt.py's tf32 field sets it; the matmul peak below too
    dtype = torch.bfloat16 if args.bf16 and device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"compile {args.compile}, dtype {dtype}, TF32 matmuls {args.tf32}, micro_batch {args.micro_batch or 'auto'}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.hdf5"
        write_synthetic_d4rl(path, args.transitions)
        start = time.perf_counter()
        data = dt.prepare_data(dt.load_d4rl_hdf5(path), reward_scale=0.001)
        load_seconds = time.perf_counter() - start
    print(f"load + cut + returns-to-go + normalise, {args.transitions} transitions "
          f"({len(data.traj_lengths)} trajectories): {load_seconds:.2f} s")

    rows = []
    for batch_size, updates in zip(args.batch_sizes, args.updates + args.updates[-1:] * len(args.batch_sizes)):
        config = dt.TrainConfig(batch_size=batch_size, compile=args.compile, bf16=args.bf16, warmup_steps=100,
                                micro_batch=args.micro_batch)
        model, seconds, matmul_seconds = time_updates(config, data, device, updates, warmup=3 if not args.compile else 5,
                                                      profile_updates=min(args.profile, updates))
        step = seconds.sum()
        flops = update_flops(model, batch_size)
        peak = matmul_peak(batch_size * 3 * config.seq_len, config.embedding_dim, device, dtype)
        rows.append((batch_size, 1 / step, seconds / step, flops, peak, flops / step / peak))
        print(f"batch {batch_size}: {1 / step:.2f} updates/s", flush=True)
        if matmul_seconds:  # the counted FLOPs are the matmuls' (the rest is elementwise work)
            print(f"  the matmuls alone run at {flops / matmul_seconds / 1e9:.0f} GFLOP/s: MFU would be "
                  f"{flops / matmul_seconds / peak:.0%} if every other op took no time", flush=True)

    print("\n| batch | updates/s | sampling | forward+backward | optimizer | GFLOP/update | peak GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for batch_size, rate, split, flops, peak, mfu in rows:
        print(f"| {batch_size} | {rate:.2f} | {split[0]:.1%} | {split[1]:.1%} | {split[2]:.1%} | "
              f"{flops / 1e9:.2f} | {peak / 1e9:.0f} | {mfu:.0%} |")
    if args.json:
        figures = {"device": str(device), "device_name": name, "torch": torch.__version__, "dtype": str(dtype),
                   "compile": args.compile, "tf32": args.tf32, "load_seconds": load_seconds, "rows": [
                       {"batch": batch_size, "updates_per_s": rate, "sampling": split[0], "forward_backward": split[1],
                        "optimizer": split[2], "gflop_per_update": flops / 1e9, "peak_gflops": peak / 1e9, "mfu": mfu}
                       for batch_size, rate, split, flops, peak, mfu in rows]}
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
