"""Neuron-selection criteria: small pure functions over weight tensors.

Each criterion takes the scoring matrix ``w`` (one row per hidden neuron, float64 or
float32, on the CPU or GPU) and the number ``k`` of neurons to keep, and returns the kept
row indices. Criteria are registered by name with :func:`register_criterion`; adding one
is writing one function. :func:`select_neurons` is the public entry point: it builds the
scoring matrix (gate and up rows concatenated for gated MLPs), fixes the compute dtype and
returns the indices sorted ascending.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..core.errors import DgmrError
from ..core.memory import out_of_memory
from ..core.registry import Registry
from .pivot import greedy_order, selection_workspace_bytes


class Criterion(Protocol):
    def __call__(self, w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor: ...


CRITERIA: Registry[Criterion] = Registry("criterion")


SCORES = ("weights", "activations")


def register_criterion(name: str, *, replace: bool = False, builtin: bool = False,
                       scores: str = "weights") -> Callable[[Criterion], Criterion]:
    """Register ``fn(w, k, *, seed) -> LongTensor`` under ``name``; an existing name is
    refused unless ``replace=True``. ``scores`` says what the rows of ``w`` are: the
    neurons' weights (fc1 rows, [gate, up] rows), or ``"activations"``: rows whose inner
    products are the neurons' activation inner products over calibration images, scaled
    by their down-projection norms (such a criterion needs calibration data)."""
    if scores not in SCORES:
        raise DgmrError(f"a criterion scores one of {', '.join(SCORES)}, got {scores!r}")

    def deco(fn: Criterion) -> Criterion:
        fn.dgmr_scores = scores  # type: ignore[attr-defined]
        return CRITERIA.add(name, fn, replace=replace, builtin=builtin)

    return deco


def get_criterion(name: str) -> Criterion:
    return CRITERIA.get_or_fail(name)


def criterion_scores(name: str) -> str:
    """What criterion ``name`` scores: ``"weights"`` or ``"activations"``."""
    return getattr(get_criterion(name), "dgmr_scores", "weights")


def workspace_bytes(h: int, d: int, dtype: torch.dtype = torch.float64) -> int:
    """Peak bytes a criterion holds beyond its (h, d) scoring matrix when it selects from an
    h x d matrix in ``dtype``: the greedy kernel's workspace, the largest of the built-ins
    (``l2`` and ``random`` hold a few vectors of length h)."""
    return selection_workspace_bytes(h, d, dtype.itemsize)


@register_criterion("diversity", builtin=True)
def diversity(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """DGMR: multi-round greedy Gram-Schmidt on the rows of ``w`` (docs/method.md, "The algorithm").

    A round starts from the *original* rows not yet kept and picks at most
    ``min(d, rows left, k - kept)`` of them; rounds repeat until ``k`` rows are kept.
    """
    h, d = w.shape
    remaining = torch.arange(h)
    picked: list[torch.Tensor] = []
    kept = 0
    while kept < k:
        n = min(d, remaining.numel(), k - kept)
        order = greedy_order(w[remaining], n)
        chosen = remaining[order]
        picked.append(chosen)
        kept += n
        mask = torch.ones(remaining.numel(), dtype=torch.bool)
        mask[order] = False
        remaining = remaining[mask]
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


@register_criterion("diversity-act", builtin=True, scores="activations")
def diversity_act(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Activation-aware DGMR: the same greedy Gram-Schmidt, on the neurons' activations over
    the calibration tokens weighted by what each writes (docs/calibration.md)."""
    return diversity(w, k, seed=seed)


@register_criterion("l2", builtin=True)
def l2(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """The ``k`` rows with the largest l2 norm (ties broken by lower index), largest first."""
    norms = torch.linalg.vector_norm(w, dim=1)
    return torch.argsort(-norms, stable=True)[:k]


@register_criterion("random", builtin=True)
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
    activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (ascending LongTensor) of the ``k`` hidden neurons to keep.

    ``w1`` is the first MLP weight, shape (hidden, in). For gated MLPs pass the gate weight
    as ``w_gate`` (same shape): neuron j is scored on [gate_j, up_j] and kept or dropped as
    a pair. Selection runs in ``dtype`` (float64 by default) whatever the weights' dtype.
    Criteria that score activations get ``activations`` (see :func:`register_criterion`)
    instead of the weights.
    """
    if w1.ndim != 2:
        raise DgmrError(f"w1 must be a 2-D weight (hidden, in), got shape {tuple(w1.shape)}")
    if w1.device.type == "meta":
        raise DgmrError("cannot score weights on the meta device: load real weights first")
    h = w1.shape[0]
    if not 0 < k <= h:
        raise DgmrError(f"cannot keep {k} of {h} hidden neurons: need 0 < k <= {h}")
    fn = get_criterion(criterion)
    if criterion_scores(criterion) == "activations" and activations is None:
        raise DgmrError(f"criterion {criterion!r} scores activations: it needs calibration images "
                        "(--calibration DATA, or dgmr.prune(..., calibration=...))")
    d = (activations if activations is not None else w1).shape[-1] * (2 if w_gate is not None else 1)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    with out_of_memory(f"selecting {k} of {h} neurons ({h} x {d} scores in {str(dtype).removeprefix('torch.')})",
                       h * d * itemsize + selection_workspace_bytes(h, d, itemsize)):
        if criterion_scores(criterion) == "activations":
            w = activations.detach().to(dtype)
        else:
            w = scoring_matrix(w1, w_gate, dtype)
        if not torch.isfinite(w).all():
            raise DgmrError("weights contain NaN or inf: refusing to score them")
        idx = fn(w, k, seed=seed)
    idx = torch.sort(idx.long().cpu()).values
    if idx.numel() != k or torch.unique(idx).numel() != k:
        raise DgmrError(f"criterion {criterion!r} returned {idx.numel()} indices ({torch.unique(idx).numel()} distinct), "
                        f"expected {k} distinct row indices")
    return idx
