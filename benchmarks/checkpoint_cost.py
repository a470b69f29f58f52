"""What a durable checkpoint costs: dt.py's checkpoint write (torch.save into memory, a temporary file, fsync,
rename, fsync of the folder, latest.pt kept as latest.prev.pt) against the same write without the two fsyncs.

    python benchmarks/checkpoint_cost.py                      # the default model (hopper sizes), in a temp folder
    python benchmarks/checkpoint_cost.py --folder /scratch/x  # on the file system the runs use

Prints figures, asserts nothing. The model is the paper-size DT (width 128, 3 layers, K 20) with an AdamW state,
as Run.save writes it; the file is about 9 MB. fsync's cost depends on the disk and on how much other dirty data
the machine holds, so measure on the file system your runs write to.
"""
import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
import dt  # noqa: E402


def checkpoint(state_dim: int = 11, action_dim: int = 3) -> dict:
    """A checkpoint of the default model after one AdamW step: the sizes of a real latest.pt."""
    model, optimizer, scheduler = dt.build_training(dt.TrainConfig(), state_dim, action_dim, torch.device("cpu"))
    model(*[torch.zeros(2, 20, *shape) for shape in ((state_dim,), (action_dim,), ())],
          torch.zeros(2, 20, dtype=torch.long)).sum().backward()
    optimizer.step()
    return {"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(), "step": 1}


def time_writes(folder: Path, state: dict, repeats: int, durable: bool) -> list:
    """Seconds per checkpoint write, as Run.save does it; durable=False skips the two fsyncs."""
    real_fsync = dt.fsync
    dt.fsync = real_fsync if durable else (lambda path: None)
    seconds = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            serialised = io.BytesIO()
            torch.save(state, serialised)
            dt.atomic_write(folder / "latest.pt", lambda tmp: tmp.write_bytes(serialised.getbuffer()), True)
            seconds.append(time.perf_counter() - start)
    finally:
        dt.fsync = real_fsync
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="where to write (default: a new temporary folder)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    state = checkpoint()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        time_writes(folder, state, 2, durable=True)  # warm-up: page cache, allocator
        results = {False: [], True: []}
        for durable in (False, True, False, True):  # interleaved: a slow moment of the disk hits both
            results[durable] += time_writes(folder, state, args.repeats // 2, durable)
        size = (folder / "latest.pt").stat().st_size
    print(f"checkpoint of {size / 1e6:.1f} MB in {args.folder or tempfile.gettempdir()}, {len(results[True])} writes each:")
    for durable in (False, True):
        times = sorted(results[durable])
        print(f"  {'with fsync (dt.py)' if durable else 'without fsync     '}: median {statistics.median(times) * 1e3:.1f} ms, "
              f"90th percentile {times[int(0.9 * len(times))] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
