"""FLOP counting and the matmul peak that both benchmarks compare against."""
import time

import torch

import dt


def forward_flops(model: dt.DecisionTransformer, batch: int, steps: int, last_only: bool) -> float:
    """Multiply-adds x 2 of one forward pass as dt.py computes it: 3T-1 tokens (a_T dropped), causal
    attention counting only the scores it needs, the last block with queries only where outputs are read."""
    E, S, A = model.timestep_emb.embedding_dim, model.state_dim, model.action_dim
    L = 3 * steps - 1

    def block(queries: int, pairs: float) -> float:  # K, V of all L tokens; Q, proj, MLP of the queries
        return 2 * L * E * 2 * E + 2 * queries * E * E + 4 * pairs * E + 2 * queries * E * E + 2 * queries * E * 8 * E

    embed = 2 * steps * (S + A + 1) * E
    full_block = block(L, L * (L + 1) / 2)
    # last block: the last token (evaluation) or the T state tokens; s_t at position 3t+1 sees 3t+2 keys
    last_block = block(1, L) if last_only else block(steps, sum(3 * t + 2 for t in range(steps)))
    per_sample = embed + (len(model.blocks) - 1) * full_block + last_block
    per_sample += 2 * E * A * (1 if last_only else steps)
    return batch * per_sample


def update_flops(model: dt.DecisionTransformer, batch: int) -> float:
    """Forward + backward (3x the full-sequence forward) FLOPs of one training update."""
    return 3 * forward_flops(model, batch, model.seq_len, last_only=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(tokens: int, dim: int, device: torch.device, dtype: torch.dtype = torch.float32,
                repeats: int = 10) -> float:
    """Best FLOP/s of a plain (tokens x E) @ (E x 4E) matmul, the model's MLP shape."""
    a = torch.randn(tokens, dim, device=device, dtype=dtype)
    b = torch.randn(dim, 4 * dim, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * tokens * dim * 4 * dim / best
