"""Minor page faults of evaluation forward passes with and without dt.keep_freed_memory() (glibc only).

glibc unmaps large freed blocks and trims the heap, so each 64-episode forward pass page-faults its
activations back in; keep_freed_memory() keeps them mapped. Each setting runs in its own process:

    python benchmarks/page_faults.py [--episodes 64] [--repeats 3]
"""
import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "algorithms"))


def measure(keep: bool, episodes: int, repeats: int) -> None:
    """Run in the child: warm up, then print minor faults and ms per forward pass."""
    import torch
    import dt
    if keep:
        dt.keep_freed_memory()
    torch.manual_seed(0)
    model = dt.DecisionTransformer(11, 3).eval()  # default size, K=20
    inputs = (torch.randn(episodes, 20, 11), torch.randn(episodes, 20, 3), torch.randn(episodes, 20),
              torch.arange(20).repeat(episodes, 1))
    with torch.no_grad():
        for _ in range(repeats):
            model(*inputs, last_only=True)
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(repeats):
            model(*inputs, last_only=True)
        elapsed = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(f"{faults / repeats:.0f} {1000 * elapsed / repeats:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64, help="eval windows per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="forward passes measured (after as many warm-ups)")
    parser.add_argument("--child", choices=["keep", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args.child == "keep", args.episodes, args.repeats)
    print(f"{'setting':>20}  {'minor faults/forward':>20}  {'ms/forward':>10}")
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--episodes", str(args.episodes),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True).stdout
        faults, ms = out.split()
        label = "keep_freed_memory" if mode == "keep" else "glibc default"
        print(f"{label:>20}  {faults:>20}  {ms:>10}")


if __name__ == "__main__":
    main()
