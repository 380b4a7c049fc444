"""Head-selection criteria: which whole attention heads a layer keeps.

A head criterion takes the layer's head blocks ``w`` of shape (heads, rows, features): block
j holds head j's rows (from :meth:`~dgmr.models.sites.attention.AttentionSite.scoring_blocks`:
row i is the concatenation of channel i's q, k, v (and gate) weight rows, as a gated MLP's
neuron owns [gate_j, up_j]) and returns the indices of the ``k`` heads to keep. Head criteria
have their own registry, :data:`HEAD_CRITERIA` (neuron criteria score rows, these score blocks
of rows); ``dgmr prune --criterion NAME`` picks a neuron criterion and, with ``--heads``, the
head criterion of the same name. :func:`select_heads` is the entry point: it fixes the
compute dtype, refuses what cannot be scored and returns the indices sorted ascending.

Criteria that score calibration statistics are registered with ``scores="activations"``:
they get ``activations`` instead of the weights, blocks (heads, rows, n) whose block Gram
matrix is the Gram of the heads' contributions to the attention output (each head's output
through its columns of the output projection, over the calibration tokens; a Cholesky or
square-root factor of that Gram, grouped by head). :func:`diversity` on such blocks is the
group-pivoted Cholesky of that Gram: ``diversity-act`` for heads is that criterion
registered on the activation blocks.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..core.errors import DgmrError
from ..core.registry import Registry
from .criteria import SCORES


class HeadCriterion(Protocol):
    def __call__(self, w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor: ...


HEAD_CRITERIA: Registry[HeadCriterion] = Registry("head criterion")


def register_head_criterion(name: str, *, replace: bool = False, builtin: bool = False,
                            scores: str = "weights") -> Callable[[HeadCriterion], HeadCriterion]:
    """Register ``fn(w, k, *, seed) -> LongTensor`` (``w``: (heads, rows, features) blocks) under
    ``name``; an existing name is refused unless ``replace=True``. ``scores``: ``"weights"``
    (the heads' q/k/v rows) or ``"activations"`` (calibration statistics, see the module doc)."""
    if scores not in SCORES:
        raise DgmrError(f"a head criterion scores one of {', '.join(SCORES)}, got {scores!r}")

    def deco(fn: HeadCriterion) -> HeadCriterion:
        fn.dgmr_scores = scores  # type: ignore[attr-defined]
        return HEAD_CRITERIA.add(name, fn, replace=replace, builtin=builtin)

    return deco


def get_head_criterion(name: str) -> HeadCriterion:
    if name not in HEAD_CRITERIA:
        raise DgmrError(f"{name!r} selects neurons only; cutting attention heads takes one of the head criteria: "
                        f"{', '.join(HEAD_CRITERIA)}")
    return HEAD_CRITERIA[name]


def head_criterion_scores(name: str) -> str:
    """What head criterion ``name`` scores: ``"weights"`` or ``"activations"``."""
    return getattr(get_head_criterion(name), "dgmr_scores", "weights")


def _directions(res: torch.Tensor, basis: torch.Tensor, tol: float) -> torch.Tensor:
    """Orthonormal rows spanning the rows of ``res`` (already orthogonal to ``basis``, up to
    rounding): its right singular vectors above ``tol``, made orthogonal to ``basis`` again."""
    _, s, vh = torch.linalg.svd(res, full_matrices=False)
    q = vh[s > tol]
    if basis.shape[0] and q.shape[0]:
        q = q - (q @ basis.T) @ basis
        q = torch.linalg.qr(q.T).Q.T
    return q


def _round(w: torch.Tensor, n: int, tol: float) -> list[int]:
    """One round of the block greedy on blocks ``w``: up to ``n`` picks, each the block whose
    residual (its rows minus their projection on the rows picked so far) has the largest
    Frobenius norm; the round ends when the picked rows reach the feature dim."""
    m, r, f = w.shape
    res = w.clone()
    basis = w.new_zeros(0, f)
    alive = torch.ones(m, dtype=torch.bool)
    picks: list[int] = []
    while len(picks) < n and alive.any() and len(picks) * r < f:
        norms = res.pow(2).sum((1, 2)).masked_fill(~alive.to(res.device), -1.0)
        j = int(torch.argmax(norms))  # the first of equal maxima: ties go to the lower index
        picks.append(j)
        alive[j] = False
        q = _directions(res[j], basis, tol)
        if q.shape[0]:
            basis = torch.cat([basis, q])
            res -= (res @ q.T) @ q
    return picks


@register_head_criterion("diversity", builtin=True)
def diversity(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Greedy Gram-Schmidt over head blocks (a block-pivoted QR): pick next the head whose rows
    add the most new span to the kept heads' rows (largest Frobenius norm of its residual).
    As for neurons, a round starts from the original rows of the heads not yet kept and ends
    when the kept rows could span the feature space; rounds repeat until ``k`` are kept.
    Returns the heads in pick order."""
    h, r, f = w.shape
    tol = max(r, f) * torch.finfo(w.dtype).eps * float(torch.linalg.matrix_norm(w, ord=2).max()) if h else 0.0
    remaining = torch.arange(h)
    picked: list[torch.Tensor] = []
    kept = 0
    while kept < k:
        order = torch.tensor(_round(w[remaining], k - kept, tol), dtype=torch.long)
        picked.append(remaining[order])
        kept += order.numel()
        mask = torch.ones(remaining.numel(), dtype=torch.bool)
        mask[order] = False
        remaining = remaining[mask]
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


@register_head_criterion("l2", builtin=True)
def l2(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """The ``k`` heads whose blocks have the largest Frobenius norm (ties: lower index), largest first."""
    return torch.argsort(-w.pow(2).sum((1, 2)).cpu(), stable=True)[:k]


@register_head_criterion("random", builtin=True)
def random(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """``k`` heads drawn uniformly without replacement, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(w.shape[0], generator=g)[:k]


@register_head_criterion("diversity-act", builtin=True, scores="activations")
def diversity_act(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """:func:`diversity` on activation blocks (calibration): block j's rows span head j's
    channels of the attention output over the calibration tokens, weighted so that a
    residual's Frobenius norm is that of the head's contribution through the output
    projection (:func:`dgmr.prune.calibration.heads.head_activations`). Picking the largest
    residual next is the group-pivoted Cholesky of the Gram of the heads' contributions."""
    return diversity(w, k, seed=seed)


def select_heads(
    blocks: torch.Tensor,
    k: int,
    criterion: str = "diversity",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (ascending LongTensor) of the ``k`` heads to keep, from the head blocks
    (heads, rows, features) (or, for a criterion that scores activations, ``activations``),
    scored in ``dtype`` (float64 by default) whatever the weights' dtype."""
    if blocks.ndim != 3:
        raise DgmrError(f"head blocks must be 3-D (heads, rows, features), got shape {tuple(blocks.shape)}")
    if blocks.device.type == "meta":
        raise DgmrError("cannot score weights on the meta device: load real weights first")
    h = blocks.shape[0]
    if not 0 < k <= h:
        raise DgmrError(f"cannot keep {k} of {h} attention heads: need 0 < k <= {h}")
    fn = get_head_criterion(criterion)
    if head_criterion_scores(criterion) == "activations":
        if activations is None:
            raise DgmrError(f"head criterion {criterion!r} scores activations: it needs calibration images")
        w = activations.detach().to(dtype)
    else:
        w = blocks.detach().to(dtype)
    if not torch.isfinite(w).all():
        raise DgmrError("weights contain NaN or inf: refusing to score them")
    idx = torch.sort(fn(w, k, seed=seed).long().cpu()).values
    if idx.numel() != k or torch.unique(idx).numel() != k or (k and (idx.min() < 0 or idx.max() >= h)):
        raise DgmrError(f"head criterion {criterion!r} returned {idx.numel()} indices "
                        f"({torch.unique(idx).numel()} distinct), expected {k} distinct head indices below {h}")
    return idx
