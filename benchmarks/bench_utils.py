"""Helpers shared by the benchmark scripts (imported from the scripts' own directory)."""
from __future__ import annotations

import time

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def gemm_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 3, device: str | torch.device = "cpu") -> float:
    """Measured FLOP/s of an n x n x n matmul (best of ``repeats``) on ``device``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def naive_greedy(w: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """The textbook greedy Gram-Schmidt loop on explicit residuals, ``n`` picks, on ``w``'s
    device and in its dtype: (picks, seconds)."""
    sync(w.device)
    t = time.perf_counter()
    r = w.clone()
    alive = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    picks = []
    for _ in range(n):
        norms = (r * r).sum(1)
        norms[~alive] = -1.0
        p = torch.argmax(norms)
        picks.append(p)
        alive[p] = False
        q = r[p] / r[p].norm()
        r -= torch.outer(r @ q, q)
    picks = torch.stack(picks).cpu()
    sync(w.device)
    return picks, time.perf_counter() - t
