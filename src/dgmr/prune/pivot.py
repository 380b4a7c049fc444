"""The greedy Gram-Schmidt kernel: the pivot order of QR with column pivoting, fast and exact.

One round of DGMR's selection (docs/method.md, "The algorithm") picks rows of the scoring
matrix in greedy Gram-Schmidt order. This module computes that order three ways, with the
same picks, and :func:`greedy_order` takes the fastest for the device and shape:

* :func:`pivot_order`: a lazy blocked greedy on the rows themselves (CPU, large layers);
* LAPACK ``geqp3`` (:func:`_qrcp_pivot_order`; CPU, layers up to ViT-L's size);
* :func:`cholesky_pivot_order`: blocked pivoted Cholesky of the Gram matrix, one
  fixed-shape step per pick replayed as a CUDA graph (GPUs).

The criteria in :mod:`dgmr.prune.criteria` call it. It is the one place in dgmr allowed a
long function (:func:`_lazy_pivot_order`): the blocked lazy loop reads best in one piece.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import numpy as np
import scipy.linalg
import torch

_POOL = 512  # candidate rows with exact residuals
_CACHE = 2048  # residuals of rows that left the pool, kept for their return
_BLOCK = 128  # pool residuals are brought up to date every this many picks at most
_SPLIT = 0.6  # a round continues in the complement of its first picks after this fraction of d
_SPLIT_MIN = 512  # ... when d is at least this
_CHUNK = 448  # float32 accumulation length of the bound refresh (as fast as one GEMM, 4x tighter at d=1792)


def selection_workspace_bytes(h: int, d: int, itemsize: int = 8) -> int:
    """Peak host bytes :func:`greedy_order` holds on the CPU, beyond its input, for an h x d
    matrix of ``itemsize``-byte floats: the lazy kernel's (the larger of the two CPU methods;
    ``geqp3`` holds one copy of the matrix): the float32 copy of the matrix, the rows
    projected onto the complement (second leg), the pivot directions in both precisions, the
    pool and its block coefficients, the residual cache and per-row temporaries. (On a GPU
    the Cholesky method holds the h x h Gram matrix in device memory.)"""
    n = min(h, d)
    return (h * d * (4 + itemsize) + n * d * (itemsize + 4) + (2 * _POOL + _CACHE) * d * itemsize
            + _POOL * _BLOCK * itemsize + h * 64 * itemsize)


def pivot_order(w: torch.Tensor, n: int, *, pool: int = _POOL) -> torch.Tensor:
    """First ``n`` rows of ``w`` in greedy Gram-Schmidt order (one round).

    Greedy rule: pick the row whose residual has the largest l2 norm, project it out of
    every remaining residual, repeat (ties: the lowest row index, like ``argmax``). This is
    the column-pivot order of QR with column pivoting (LAPACK ``geqp3``) of ``w.T``.

    It runs as a *lazy blocked* greedy (:func:`_lazy_pivot_order`) in ``w``'s dtype and on
    ``w``'s device (CUDA included): exact residuals are kept for a pool of ``pool`` leading
    candidates only, every other row carries an upper bound on its residual norm, and the
    bounds are brought up to date with one GEMM per block of picks (in float32 with a
    rigorous rounding allowance when ``w`` is float64 on the CPU). A pick is made only when
    its exact residual norm beats every other row's bound, so the picks are the greedy
    loop's picks; the bulk of the work is ``2 * h * d * n`` flops of GEMM. After 60% of the
    picks the round continues on the rows projected onto the remaining subspace
    (:func:`_split_pivot_order`), where everything is shorter. When a residual
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
    order = _split_pivot_order(w.detach(), n, pool=pool)
    if order is None:
        return _qrcp_pivot_order(w, n)
    return order


def _split_pivot_order(w: torch.Tensor, n: int, *, pool: int = _POOL) -> torch.Tensor | None:
    """The greedy order in two legs: the first ``_SPLIT * d`` picks on ``w``, then the rest
    on the unpicked rows projected onto the orthogonal complement of the picked directions
    (``w @ U``, ``U`` from a complete QR of those directions), recursively. The residuals of
    the second leg are exactly those of the first leg continued, so are its picks; its rows
    are ``d - j0`` long, so every later step is that much cheaper, and its bounds start
    exact. ``None`` if a leg meets a numerically zero residual."""
    h, d = w.shape
    j0 = int(d * _SPLIT)
    split = d >= _SPLIT_MIN and n > j0
    got = _lazy_pivot_order(w, j0 if split else n, pool=pool)
    if got is None:
        return None
    first, Q = got
    if not split:
        return first
    U = torch.linalg.qr(Q[:j0].T, mode="complete").Q[:, j0:]  # d x (d - j0), orthonormal columns
    rest = torch.ones(h, dtype=torch.bool, device=w.device)
    rest[first.to(w.device)] = False
    idx = torch.nonzero(rest).squeeze(1)  # ascending: ties still go to the lowest row
    second = _split_pivot_order((w @ U)[idx], n - j0, pool=pool)
    if second is None:
        return None
    return torch.cat([first, idx[second.to(w.device)].cpu()])


def _qrcp_pivot_order(w: torch.Tensor, n: int) -> torch.Tensor:
    """Reference path: LAPACK ``geqp3`` (scipy) on ``w.T``, on the CPU."""
    # a private C-contiguous (h, d) copy; its transpose is a Fortran-ordered (d, h) array
    # that geqp3 factorises in place without another copy.
    a = np.array(w.detach().cpu().numpy(), order="C", copy=True)
    _, piv = scipy.linalg.qr(a.T, mode="r", pivoting=True, overwrite_a=True, check_finite=False)
    return torch.from_numpy(np.ascontiguousarray(piv[:n])).long()


_threads_lock = threading.Lock()
_threads_state = {"users": 0, "saved": 1}


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch CPU ops single-threaded inside the block (no-op on other devices).

    torch's thread count is process-wide: when several layers are selected at once (one
    Python thread each), the first to enter saves it and the last to leave restores it."""
    if device.type != "cpu":
        yield
        return
    with _threads_lock:
        if _threads_state["users"] == 0:
            _threads_state["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_state["users"] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_state["users"] -= 1
            if _threads_state["users"] == 0:
                torch.set_num_threads(_threads_state["saved"])


def _lazy_pivot_order(w: torch.Tensor, n: int, *, pool: int = _POOL,
                      cache: int = _CACHE) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Greedy pivot order by lazy evaluation: ``(picks, Q)`` (``Q`` the unit directions picked,
    one per row); ``None`` when a picked residual is ~0.

    State: ``Q`` (the picked residual directions, orthonormal); ``s`` (per row, an upper
    bound on its squared residual norm: exact after a refresh up to rounding, and residual
    norms only shrink); a pool of candidate rows with their exact residuals (brought up to
    date once per block of picks); and a cache of the residuals of rows that were in
    the pool lately, each with the number of directions it is orthogonal to (a row that
    comes back is brought up to date with the directions it missed instead of from ``w``).

    A refresh downdates ``s`` with the directions picked since the last one (one
    ``h x d x b`` GEMM), re-forms the pool from the rows with the largest bounds and sets
    ``tau``, the largest bound outside the pool. Between refreshes the best pool row is
    picked as long as its exact squared norm exceeds ``tau``; otherwise refresh (and if a
    refresh made no progress, double the pool until it does).

    On the CPU with float64 ``w`` the refresh GEMM runs in float32 (about 3x the float64
    rate), its columns cut into chunks accumulated in float32 and summed in float64. Its
    rounding error is bounded per row (``delta``: the standard dot-product bound
    ``gamma_L |w_i| |q|`` for chunk length ``L``, plus the roundings of ``w`` and ``q`` to
    float32) and added
    to the bound, so ``s`` stays an upper bound and the picks stay the exact float64 greedy
    picks; a pool row's bound is reset to its exact float64 norm.
    """
    h, d = w.shape
    dt, dev = w.dtype, w.device
    eps = torch.finfo(dt).eps
    ninf = torch.tensor(-float("inf"), dtype=dt, device=dev)
    s = torch.einsum("ij,ij->i", w, w)
    smax = float(s.max())
    if not smax > 0:
        return None
    # rounding allowance of the float64 bookkeeping (generous: it only costs extra refreshes)
    slack = 8.0 * eps * d * smax
    tiny = 4.0 * eps * d * smax
    # (not when float32 matmuls may run in reduced precision, nor for magnitudes that float32
    # cannot hold: the allowance assumes plain float32 arithmetic on normal numbers)
    lowp = (dt == torch.float64 and dev.type == "cpu" and torch.get_float32_matmul_precision() == "highest"
            and 1e-30 < smax < 1e30)
    if lowp:
        # w in float32, its columns cut into ``nc`` chunks of ``ln`` (zero-padded): each
        # chunk's dot products accumulate in float32, the chunk sums add up in float64
        nc = max(1, round(d / _CHUNK))
        ln = -(-d // nc)
        w_lo = torch.empty(nc, h, ln, dtype=torch.float32, device=dev)
        for c in range(nc):
            part = w[:, c * ln:(c + 1) * ln]
            w_lo[c, :, :part.shape[1]] = part
            w_lo[c, :, part.shape[1]:] = 0
        u = 2.0**-24
        gamma = ln * u / (1 - ln * u)
        # the last u: rounding w to float32 (zero for bf16 / float32 weights; not worth a check)
        coef = 1.01 * (gamma * (1 + u) ** 2 + u * (1 + u) + u)
        delta = coef * s.sqrt()  # |computed w_i . q - w_i . q| <= delta_i for a unit q
    alive = torch.ones(h, dtype=torch.bool, device=dev)
    Q = torch.empty(n, d, dtype=dt, device=dev)
    picks: list[int] = []
    applied = 0  # directions Q[:applied] are folded into s
    # residual cache: slot -> row (-1: free), level (directions the residual is orthogonal to)
    cap = max(cache, pool)
    c_res = torch.empty(cap, d, dtype=dt, device=dev)
    c_row = torch.full((cap,), -1, dtype=torch.long, device=dev)
    c_lvl = torch.zeros(cap, dtype=torch.long, device=dev)
    slot = torch.full((h,), -1, dtype=torch.long, device=dev)
    m = pool
    while len(picks) < n:
        j = len(picks)
        if applied < j:
            if lowp:
                qb = torch.zeros(j - applied, nc * ln, dtype=torch.float32, device=dev)
                qb[:, :d] = Q[applied:j]
                p = torch.bmm(w_lo, qb.view(j - applied, nc, ln).permute(1, 2, 0)).double().sum(0)
                s -= torch.einsum("ij,ij->i", p, p)
                s += delta * (2.0 * p.abs().sum(1) + (j - applied) * delta)
            else:
                p = w @ Q[applied:j].T
                s -= torch.einsum("ij,ij->i", p, p)
            del p
            applied = j
        left = h - j
        mm = min(m, left)
        vals, rows = torch.topk(torch.where(alive, s, ninf), min(mm + 1, left))
        tau = float(vals[mm]) + slack if mm < left else -float("inf")
        rows = torch.sort(rows[:mm]).values  # ascending: argmax ties go to the lowest row
        res, lvl = _gather_residuals(w, rows, slot, c_res, c_lvl)
        _bring_up_to_date(res, lvl, Q, j)
        norms = torch.einsum("ij,ij->i", res, res)
        s[rows] = norms  # exact at level j == applied: drops the float32 allowance
        progressed = False
        # Pool residuals are updated once per block of picks: pick t of the block needs
        # only v = res @ q (q is orthogonal to the block's earlier directions, so the stale
        # residuals give the same projections) and the picked row's own residual, rebuilt
        # from its column of V. The per-pick GEMV is memory-bound: one thread does it best
        # (and does not stall when other processes hold the cores); GEMMs use them all.
        start, t = len(picks), 0
        V = torch.empty(mm, min(n - j, _BLOCK), dtype=dt, device=dev)
        with _one_cpu_thread(dev):
            while len(picks) < n:
                b = int(torch.argmax(norms))
                c = float(norms[b])
                if not c > tau:
                    break
                if not c > tiny:
                    return None
                progressed = True
                r = res[b] - V[b, :t] @ Q[start:start + t] if t else res[b]
                q = r / torch.linalg.vector_norm(r)  # unit length, as the float32 allowance assumes
                Q[len(picks)] = q
                picks.append(int(rows[b]))
                alive[rows[b]] = False
                v = torch.mv(res, q)
                norms.sub_(v * v)
                norms[b] = -float("inf")
                V[:, t] = v
                t += 1
                if t == V.shape[1]:
                    res.sub_(V @ Q[start:start + t])
                    start, t = start + t, 0
        if t:
            res.sub_(V[:, :t] @ Q[start:start + t])
        _store_residuals(rows, res, norms, len(picks), s, slot, c_res, c_row, c_lvl)
        m = pool if progressed else 2 * m
    return torch.tensor(picks, dtype=torch.long), Q


def _gather_residuals(w, rows, slot, c_res, c_lvl):
    """Residuals of ``rows`` as cached (with their levels), or the raw rows (level 0)."""
    at = slot[rows]
    hit = at >= 0
    res = torch.empty(rows.numel(), w.shape[1], dtype=w.dtype, device=w.device)
    lvl = torch.zeros(rows.numel(), dtype=torch.long, device=w.device)
    res[hit] = c_res[at[hit]]
    lvl[hit] = c_lvl[at[hit]]
    res[~hit] = w[rows[~hit]]
    return res, lvl


def _bring_up_to_date(res, lvl, Q, j):
    """Project out of each residual the directions ``Q[lvl_i:j]`` it has not seen.

    Rows are grouped by how far behind they are (powers of two), and a group is projected
    against every direction its most-behind row missed: one GEMM pair per group, at most
    twice the work of doing each row alone (projecting again onto a direction a residual is
    already orthogonal to changes it only at rounding level)."""
    behind = j - lvl
    if not bool((behind > 0).any()):
        return
    band = torch.where(behind > 0, torch.floor(torch.log2(behind.clamp(min=1).double())).long(), -1)
    for t in torch.unique(band).tolist():
        if t < 0:
            continue
        pos = torch.nonzero(band == t).squeeze(1)
        lo = j - int(behind[pos].max())
        x = res[pos]
        x -= (x @ Q[lo:j].T) @ Q[lo:j]
        res[pos] = x


def _store_residuals(rows, res, norms, level, s, slot, c_res, c_row, c_lvl):
    """Put the pool's unpicked residuals (current at ``level``) into the cache; picked rows
    leave it. New rows take free slots, then the slots of the cached rows with the smallest
    bounds that are not in this pool."""
    live = torch.isfinite(norms)
    picked = rows[~live]
    old = slot[picked]
    old = old[old >= 0]
    c_row[old] = -1
    slot[picked] = -1
    rows, res = rows[live], res[live]
    at = slot[rows]
    hit = at >= 0
    if bool(hit.any()):
        c_res[at[hit]] = res[hit]
        c_lvl[at[hit]] = level
    new = torch.nonzero(~hit).squeeze(1)
    if not new.numel():
        return
    score = torch.where(c_row >= 0, s[c_row.clamp(min=0)], torch.full_like(s[:1], -float("inf")).expand(c_row.numel()))
    score[at[hit]] = float("inf")  # this pool's rows stay
    free = int((score < float("inf")).sum())
    if new.numel() > free:  # a doubled pool larger than the cache: keep its best rows
        new = new[torch.topk(norms[live][new], free).indices] if free else new[:0]
    if not new.numel():
        return
    slots = torch.topk(score, new.numel(), largest=False).indices
    evicted = c_row[slots]
    slot[evicted[evicted >= 0]] = -1
    c_row[slots] = rows[new]
    c_res[slots] = res[new]
    c_lvl[slots] = level
    slot[rows[new]] = slots


# ---------------------------------------------------------------------------------------
# choosing the method, and the GPU method
_QRCP_MAX = 4096 * 1024  # CPU: up to ViT-L's layer size LAPACK geqp3 is as fast or faster (benchmarks/selection.py)
_CHOL_BLOCK = 128  # picks between two trailing updates of the Gram matrix
METHODS = ("auto", "lazy", "qrcp", "cholesky")


def greedy_order(w: torch.Tensor, n: int, *, method: str = "auto") -> torch.Tensor:
    """First ``n`` rows of ``w`` in greedy Gram-Schmidt order, by the method that suits the
    device and shape (``auto``): on a GPU, and for matrices at least as wide as tall (the
    activation factors of ``diversity-act``), the blocked pivoted Cholesky
    (:func:`cholesky_pivot_order`); otherwise on the CPU LAPACK ``geqp3`` up to ViT-L's
    layer size and the lazy blocked greedy (:func:`pivot_order`) above it. Every method gives the
    greedy picks (docs/method.md, "The algorithm"); they differ in speed only."""
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "auto":  # square matrices (activation factors, diversity-act) are the Gram matrix's own size
        method = ("cholesky" if w.device.type == "cuda" or w.shape[1] >= w.shape[0] else
                  "qrcp" if w.numel() <= _QRCP_MAX else "lazy")
    h, d = w.shape
    if n > min(h, d):
        raise ValueError(f"one round picks at most min(rows, cols) = {min(h, d)} rows, asked {n}")
    if not w.dtype.is_floating_point or w.dtype.itemsize < 4:  # LAPACK and numpy know no bf16/fp16
        w = w.float()
    if method == "lazy":
        return pivot_order(w, n)
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    if method == "cholesky":
        order = cholesky_pivot_order(w, n)
        if order is not None:
            return order
    return _qrcp_pivot_order(w, n)


class _CholeskyRound:
    """A round of greedy Gram-Schmidt as blocked pivoted Cholesky of ``G = w w^T``.

    ``dres`` holds every row's squared residual norm (the diagonal of ``G - L L^T``). A pick
    takes its argmax ``p`` (the lowest index on ties), forms column ``p`` of the residual
    Gram matrix from ``G`` (brought up to date once per block) and the block's columns ``L``,
    scales it by ``1/sqrt(dres[p])`` into the next column of ``L`` and subtracts its square
    from ``dres``: one greedy step written on inner products. ``G`` and ``L`` share one buffer
    so that one gather reads both rows ``p``. A pick has fixed shapes and keeps every index
    on the device (no host sync), so a CUDA graph replays it: its ten small kernels would
    otherwise cost more to launch than to run."""

    def __init__(self, w: torch.Tensor, block: int):
        h, dev, dt = w.shape[0], w.device, w.dtype
        self.h = h
        self.GL = torch.zeros(h, h + block, dtype=dt, device=dev)  # [G | L]
        torch.mm(w, w.T, out=self.G)
        self.dres = torch.diagonal(self.G).clone()
        self.scale = float(self.dres.max()) or 1.0
        self.picked = torch.zeros(block, dtype=torch.long, device=dev)  # the block's picks, in order
        self.col = torch.zeros(1, dtype=torch.long, device=dev)  # the column of L the next pick fills
        self.taken = torch.full((1,), -float("inf"), dtype=dt, device=dev)

    @property
    def G(self) -> torch.Tensor:
        return self.GL[:, :self.h]

    @property
    def L(self) -> torch.Tensor:
        return self.GL[:, self.h:]

    def pick(self) -> None:
        p = torch.argmax(self.dres).view(1)
        row = self.GL.index_select(0, p).view(-1)
        g = torch.addmv(row[:self.h], self.L, row[self.h:], alpha=-1)  # L's unfilled columns are 0
        col = g * g.index_select(0, p).rsqrt()
        self.L.index_copy_(1, self.col, col.view(-1, 1))
        self.dres.addcmul_(col, col, value=-1)
        self.dres.index_copy_(0, p, self.taken)
        self.picked.index_copy_(0, self.col, p)
        self.col += 1

    def end_block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The trailing update ``G -= L L^T``; returns (the block's picks, their squared residual norms)."""
        picks = self.picked[:b].clone()
        values = self.L[picks, torch.arange(b, device=picks.device)] ** 2
        self.G.addmm_(self.L, self.L.T, alpha=-1)
        self.L.zero_()
        self.col.zero_()
        return picks, values


def _capture(fn: Callable[[], None], state: list[torch.Tensor]) -> Callable[[], None]:
    """``fn`` captured as a CUDA graph (warmed up on a side stream first, its effect on
    ``state`` undone), returned as the graph's replay."""
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    for t, v in zip(state, saved):
        t.copy_(v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def cholesky_pivot_order(w: torch.Tensor, n: int, *, block: int = _CHOL_BLOCK,
                         graph: bool | None = None) -> torch.Tensor | None:
    """First ``n`` rows of ``w`` in greedy Gram-Schmidt order by blocked pivoted Cholesky of
    ``w w^T`` (whose pivot order is the greedy order): ``2 h^2 (d + n)`` flops of GEMM plus
    ten small kernels per pick, replayed as a CUDA graph on GPUs (``graph``, default: on
    CUDA). Holds the h x h Gram matrix, so it suits GPUs; the same code runs on CPU tensors
    (tests). ``None`` when a residual is numerically zero (rank-deficient ``w``)."""
    if not w.dtype.is_floating_point or w.dtype.itemsize < 4:
        w = w.float()
    block = max(1, min(block, n))
    rnd = _CholeskyRound(w.detach(), block)
    use_graph = w.device.type == "cuda" if graph is None else graph
    # the warm-up pick of the capture only touches what the state list restores (not G)
    pick = _capture(rnd.pick, [rnd.L, rnd.dres, rnd.picked, rnd.col]) if use_graph else rnd.pick
    picks, values = [], []
    for start in range(0, n, block):
        b = min(block, n - start)
        for _ in range(b):
            pick()
        p, v = rnd.end_block(b)
        picks.append(p)
        values.append(v)
    # a pick whose squared residual is within the Gram matrix's rounding error is no direction
    smallest = float(torch.cat(values).min()) / rnd.scale
    if not smallest > 64 * w.shape[1] * torch.finfo(w.dtype).eps:
        return None
    return torch.cat(picks).cpu()
