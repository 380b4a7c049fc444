"""``allocate="global"``: spend the uniform request's MLP parameters where they matter most.

For every MLP the calibration statistics give its relative output error as a function of
the width k (keeping the criterion's first k neurons, with or without the least-squares
refit); a greedy exchange then hands out neurons, starting from a per-layer floor, to the
layer whose error drops most per parameter, until the uniform request's total is spent
(docs/calibration.md, "Global allocation").
"""
from __future__ import annotations

import heapq
import math

import torch

from ...models.sites.attention import AttentionSite
from ...models.sites.mlp import MlpSite
from .moments import Moments


def compensated_curve(mom: Moments, order: torch.Tensor, ridge: float) -> torch.Tensor:
    """Relative error after the least-squares refit when keeping ``order[:k]``, for k = 0..h.

    One Cholesky of the activations' Gram matrix in ``order`` (bias column first) gives every
    prefix at once: the energy of the target explained by the first j regressors is the sum
    of the first j squared rows of L^-1 C."""
    assert mom.G is not None and mom.C is not None
    h = order.numel()
    order = order.to(mom.G.device)
    idx = torch.cat([order.new_tensor([h]), order]) if mom.bias else order
    g = mom.G[idx][:, idx].clone()
    g.diagonal()[-h:].add_(max(ridge, 1e-10) * float(mom.G.diagonal()[:h].mean()) + 1e-300)
    z = torch.linalg.solve_triangular(torch.linalg.cholesky(g), mom.C[idx], upper=False)
    explained = torch.cumsum((z * z).sum(1), 0)
    yy = mom.yy or 1.0
    prefix = explained[-h - 1:] if mom.bias else torch.cat([explained.new_zeros(1), explained])
    return ((yy - prefix) / yy).clamp_min(0.0).cpu()


def dropped_curve(mom: Moments, order: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Relative error with the original weights when keeping ``order[:k]``, for k = 0..h: the
    output the dropped neurons wrote, ||H_D W_D^T||^2 = sum over dropped i, j of G_ij (w_i . w_j)."""
    assert mom.G is not None
    h = order.numel()
    order, w0 = order.to(mom.G.device), w0.to(mom.G.device)
    q = mom.G[:h, :h][order][:, order] * (w0.T @ w0)[order][:, order]
    step = q.diagonal() + 2 * torch.triu(q, diagonal=1).sum(1)  # what order[i] adds to the suffix sum from i
    suffix = torch.cat([step.flip(0).cumsum(0).flip(0), q.new_zeros(1)])
    return (suffix / (mom.yy or 1.0)).cpu()


def neuron_cost(site: MlpSite) -> float:
    """Parameters one hidden neuron of ``site`` holds (rows of up/gate, a norm channel, a down column)."""
    total = sum(p.numel() for part in site.parts for p in part.parameters(recurse=False))
    fixed = site.down.bias.numel() if site.down.bias is not None else 0
    return (total - fixed) / site.hidden


def width_step(site: MlpSite) -> int:
    """Widths must be multiples of this (the group count of a GroupNorm over the hidden dim)."""
    step = 1
    for norm in site.norms:
        groups = getattr(norm, "num_groups", None)
        if isinstance(groups, int) and groups > 1 and groups != getattr(norm, "num_channels", None):
            step = math.lcm(step, groups)
    return step


def head_cost(site: AttentionSite) -> float:
    """Parameters one attention head of ``site`` holds (its q, k, v and gate rows and biases,
    its output-projection columns, its channels of width norms, its entries of per-head tables)."""
    total = sum(p.numel() for part in site.parts for p in part.parameters(recurse=False))
    fixed = site.proj.bias.numel() if site.proj.bias is not None else 0
    return (total - fixed) / site.heads


def bounds(reference: list[float], hidden: list[int], steps: list[int], floor: float,
           ceiling: float) -> tuple[list[int], list[int]]:
    """Each layer's allowed widths: within [floor, ceiling] x its ``reference`` width (the
    uniform one), multiples of its step, at least one step and at most its original width."""
    lo = [max(s, math.ceil(floor * k / s) * s) for k, s in zip(reference, steps)]
    hi = [min(h // s * s, max(lo_, math.floor(ceiling * k / s) * s)) for k, h, s, lo_ in zip(reference, hidden, steps, lo)]
    return lo, hi


def spend(curves: list[torch.Tensor], costs: list[float], budget: float, lo: list[int], hi: list[int],
          steps: list[int]) -> list[int]:
    """Widths within [lo, hi] with total cost at most ``budget`` that greedily minimise the
    summed relative errors: from ``lo``, one step at a time to the layer whose error drops
    most per parameter, while the next step fits."""
    widths = list(lo)
    spent = sum(c * k for c, k in zip(costs, widths))
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        k, s = widths[i], steps[i]
        if k + s <= hi[i]:
            gain = float(curves[i][k] - curves[i][k + s]) / (costs[i] * s)
            heapq.heappush(heap, (-gain, i))

    for i in range(len(widths)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        extra = costs[i] * steps[i]
        if spent + extra > budget * (1 + 1e-12):
            continue  # this layer's next step no longer fits; cheaper layers may still
        widths[i] += steps[i]
        spent += extra
        push(i)
    return widths
