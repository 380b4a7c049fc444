"""Neuron-selection criteria: small pure functions over weight tensors.

Each criterion takes the scoring matrix ``w`` (one row per hidden neuron, float64 or
float32, on the CPU or GPU) and the number ``k`` of neurons to keep, and returns the kept
row indices. Criteria are registered by name with :func:`register_criterion`; adding one
is writing one function. :func:`select_neurons` is the public entry point: it builds the
scoring matrix (gate and up rows concatenated for gated MLPs), fixes the compute dtype and
returns the indices sorted ascending.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol

import numpy as np
import scipy.linalg
import torch

from .errors import DgmrError


class Criterion(Protocol):
    def __call__(self, w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor: ...


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Register ``fn(w, k, *, seed) -> LongTensor`` under ``name``."""

    def deco(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return deco


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise DgmrError(f"unknown criterion {name!r}; choose one of: {', '.join(sorted(CRITERIA))}") from None


def pivot_order(w: torch.Tensor, n: int, *, pool: int = 512) -> torch.Tensor:
    """First ``n`` rows of ``w`` in greedy Gram-Schmidt order (one round).

    Greedy rule: pick the row whose residual has the largest l2 norm, project it out of
    every remaining residual, repeat (ties: the lowest row index, like ``argmax``). This is
    the column-pivot order of QR with column pivoting (LAPACK ``geqp3``) of ``w.T``.

    It runs as a *lazy blocked* greedy (:func:`_lazy_pivot_order`) in ``w``'s dtype and on
    ``w``'s device (CUDA included): exact residuals are kept for a pool of ``pool`` leading
    candidates only, every other row carries an upper bound on its residual norm, and the
    bounds are brought up to date with one GEMM per block of picks. A pick is made only when
    its exact residual norm beats every other row's bound, so the picks are the greedy
    loop's picks; the bulk of the work is ``2 * h * d * n`` flops of GEMM. When a residual
    becomes numerically zero (rank-deficient ``w``) the order falls back to LAPACK
    ``geqp3``. ``n`` must be at most ``min(w.shape)``.
    """
    h, d = w.shape
    if n > min(h, d):
        raise ValueError(f"one round picks at most min(rows, cols) = {min(h, d)} rows, asked {n}")
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    if not w.dtype.is_floating_point or w.dtype.itemsize < 4:
        w = w.float()
    order = _lazy_pivot_order(w.detach(), n, pool=pool)
    if order is None:
        return _qrcp_pivot_order(w, n)
    return order


def _qrcp_pivot_order(w: torch.Tensor, n: int) -> torch.Tensor:
    """Reference path: LAPACK ``geqp3`` (scipy) on ``w.T``, on the CPU."""
    # a private C-contiguous (h, d) copy; its transpose is a Fortran-ordered (d, h) array
    # that geqp3 factorises in place without another copy.
    a = np.array(w.detach().cpu().numpy(), order="C", copy=True)
    _, piv = scipy.linalg.qr(a.T, mode="r", pivoting=True, overwrite_a=True, check_finite=False)
    return torch.from_numpy(np.ascontiguousarray(piv[:n])).long()


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch CPU ops single-threaded inside the block (no-op on other devices)."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _lazy_pivot_order(w: torch.Tensor, n: int, *, pool: int = 512) -> torch.Tensor | None:
    """Greedy pivot order by lazy evaluation; ``None`` when a picked residual is ~0.

    State: ``Q`` (the picked residual directions, orthonormal), ``s`` (per row, the squared
    residual norm as of the last refresh: an upper bound on its current value, since
    residual norms only shrink), and a pool of candidate rows with their exact residuals
    (kept current by rank-1 updates, as in the naive loop). A refresh downdates ``s`` with
    the directions picked since the last one (one ``h x d x b`` GEMM), re-forms the pool
    from the rows with the largest bounds (only newcomers' residuals are computed) and sets
    ``tau``, the largest bound outside the pool. Between refreshes the best pool row is
    picked as long as its exact squared norm exceeds ``tau``; otherwise refresh (and if a
    refresh made no progress, double the pool until it does).
    """
    h, d = w.shape
    dt, dev = w.dtype, w.device
    eps = torch.finfo(dt).eps
    ninf = torch.tensor(-float("inf"), dtype=dt, device=dev)
    s = torch.einsum("ij,ij->i", w, w)
    smax = float(s.max())
    if not smax > 0:
        return None
    # rounding allowance on the downdated bounds (generous: it only costs extra refreshes)
    slack = 8.0 * eps * d * smax
    tiny = 4.0 * eps * d * smax
    alive = torch.ones(h, dtype=torch.bool, device=dev)
    where = torch.full((h,), -1, dtype=torch.long, device=dev)  # row -> position in the pool
    Q = torch.empty(n, d, dtype=dt, device=dev)
    picks: list[int] = []
    applied = 0  # directions Q[:applied] are folded into s
    pool_rows = torch.empty(0, dtype=torch.long, device=dev)
    pool_res = torch.empty(0, d, dtype=dt, device=dev)
    m = pool
    while len(picks) < n:
        j = len(picks)
        if applied < j:
            proj = w @ Q[applied:j].T
            s -= torch.einsum("ij,ij->i", proj, proj)
            applied = j
        left = h - j
        mm = min(m, left)
        vals, rows = torch.topk(torch.where(alive, s + slack, ninf), min(mm + 1, left))
        tau = float(vals[mm]) if mm < left else -float("inf")
        rows = torch.sort(rows[:mm]).values  # ascending: argmax ties go to the lowest row
        at = where[rows]
        have = at >= 0
        res = torch.empty(mm, d, dtype=dt, device=dev)
        if bool(have.any()):
            res[have] = pool_res[at[have]]
        fresh = rows[~have]
        if fresh.numel():
            r = w[fresh]
            if j:
                r -= (r @ Q[:j].T) @ Q[:j]
            res[~have] = r
        where[pool_rows] = -1
        norms = torch.where(alive[rows], torch.einsum("ij,ij->i", res, res), ninf)
        progressed = False
        # the per-pick steps are small GEMVs on the pool: one thread does them best (and
        # does not stall when other processes hold the cores); GEMMs above use them all
        with _one_cpu_thread(dev):
            while len(picks) < n:
                b = int(torch.argmax(norms))
                c = float(norms[b])
                if not c > tau:
                    break
                if not c > tiny:
                    return None
                progressed = True
                q = res[b] / c ** 0.5
                Q[len(picks)] = q
                picks.append(int(rows[b]))
                alive[rows[b]] = False
                v = res @ q
                res.addr_(v, q, alpha=-1)
                norms.sub_(v * v)
                norms[b] = -float("inf")
        keep = torch.isfinite(norms)
        pool_rows, pool_res = rows[keep], res[keep]
        where[pool_rows] = torch.arange(pool_rows.numel(), device=dev)
        m = pool if progressed else 2 * m
    return torch.tensor(picks, dtype=torch.long)


@register_criterion("diversity")
def diversity(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """DGMR: multi-round greedy Gram-Schmidt on the rows of ``w`` (method.md section 2).

    A round starts from the *original* rows not yet kept and picks at most
    ``min(d, rows left, k - kept)`` of them; rounds repeat until ``k`` rows are kept.
    """
    h, d = w.shape
    remaining = torch.arange(h)
    picked: list[torch.Tensor] = []
    kept = 0
    while kept < k:
        n = min(d, remaining.numel(), k - kept)
        order = pivot_order(w[remaining], n)
        chosen = remaining[order]
        picked.append(chosen)
        kept += n
        mask = torch.ones(remaining.numel(), dtype=torch.bool)
        mask[order] = False
        remaining = remaining[mask]
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


@register_criterion("l2")
def l2(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """The ``k`` rows with the largest l2 norm (ties broken by lower index)."""
    norms = torch.linalg.vector_norm(w, dim=1)
    return torch.sort(torch.argsort(-norms, stable=True)[:k]).values


@register_criterion("random")
def random(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """``k`` rows drawn uniformly without replacement, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(w.shape[0], generator=g)[:k]


def scoring_matrix(w1: torch.Tensor, w_gate: torch.Tensor | None = None, dtype=torch.float64) -> torch.Tensor:
    """Row j = what hidden neuron j owns: its fc1 row, or [gate row, up row] for gated MLPs."""
    if w_gate is not None:
        if w_gate.shape != w1.shape:
            raise DgmrError(f"gate weight shape {tuple(w_gate.shape)} differs from up weight shape {tuple(w1.shape)}")
        w1 = torch.cat([w_gate.to(dtype), w1.to(dtype)], dim=1)
    return w1.detach().to(dtype)


def select_neurons(
    w1: torch.Tensor,
    k: int,
    criterion: str = "diversity",
    *,
    w_gate: torch.Tensor | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Indices (ascending LongTensor) of the ``k`` hidden neurons to keep.

    ``w1`` is the first MLP weight, shape (hidden, in). For gated MLPs pass the gate weight
    as ``w_gate`` (same shape): neuron j is scored on [gate_j, up_j] and kept or dropped as
    a pair. Selection runs in ``dtype`` (float64 by default) whatever the weights' dtype.
    """
    if w1.ndim != 2:
        raise DgmrError(f"w1 must be a 2-D weight (hidden, in), got shape {tuple(w1.shape)}")
    if w1.device.type == "meta":
        raise DgmrError("cannot score weights on the meta device: load real weights first")
    h = w1.shape[0]
    if not 0 < k <= h:
        raise DgmrError(f"cannot keep {k} of {h} hidden neurons: need 0 < k <= {h}")
    fn = get_criterion(criterion)
    w = scoring_matrix(w1, w_gate, dtype)
    if not torch.isfinite(w).all():
        raise DgmrError("weights contain NaN or inf: refusing to score them")
    idx = fn(w, k, seed=seed)
    idx = torch.sort(idx.long().cpu()).values
    if idx.numel() != k or torch.unique(idx).numel() != k:
        raise AssertionError(f"criterion {criterion!r} returned {idx.numel()} indices (unique {torch.unique(idx).numel()}), expected {k}")
    return idx
