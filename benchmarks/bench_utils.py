"""Helpers shared by the benchmark scripts (imported from the scripts' own directory)."""
from __future__ import annotations

import time

import torch


def gemm_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Measured FLOP/s of an n x n x n matmul on the CPU (best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def naive_greedy(w: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """The textbook greedy Gram-Schmidt loop on explicit residuals, ``n`` picks: (picks, seconds)."""
    t = time.perf_counter()
    r = w.clone()
    alive = torch.ones(w.shape[0], dtype=torch.bool)
    picks = []
    for _ in range(n):
        norms = (r * r).sum(1)
        norms[~alive] = -1.0
        p = int(torch.argmax(norms))
        picks.append(p)
        alive[p] = False
        q = r[p] / r[p].norm()
        r -= torch.outer(r @ q, q)
    return torch.tensor(picks), time.perf_counter() - t
