"""Calibrated head removal: attention layers as steps of the calibrated prune (docs/heads.md,
"Calibration").

A :class:`HeadStep` scores one attention layer's heads (on its weights, or with
``diversity-act`` on the heads' contributions to the attention output over the calibration
tokens), removes the others (:func:`~dgmr.models.sites.attention.shrink_heads`) and refits
the output projection (weight and bias) by the ridge least squares that refits an MLP's
down projection: its regressors are the kept heads' channels of the attention output, its
target the original layer's output on the same input. In the sweep a block's attention
runs before its MLP, so the MLP is then fitted on the cut and refitted attention's output.

Each head's output depends on its own q, k, v rows only, so without a norm over the
attention width the cut layer's projection input is the kept channels of the original's
(one pass gives the statistics); a width norm (timm's scale norm, EVA's inner norm)
renormalises after the cut, so a pass then runs the cut layer beside a copy of the original.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from ...core.errors import DgmrError
from ...core.memory import out_of_memory
from ...models.sites.attention import AttentionSite, head_channels, shrink_heads
from ..head_criteria import get_head_criterion, head_criterion_scores, select_heads
from .allocate import compensated_curve, dropped_curve, head_cost
from .moments import Moments, hidden_moments, moment_bytes
from .refit import cut_and_refit, down_coefficients
from .runner import Pass
from .settings import CalibrationSettings
from .sweep import SiteStep


def head_activations(mom: Moments, site: AttentionSite, ridge: float) -> torch.Tensor:
    """Blocks (heads, head_dim, width) for an activation head criterion: with G = L Lᵀ the
    Gram of the attention output's channels over the calibration tokens, block j is
    R_j L_j, where L_j holds head j's rows of L and R_jᵀ R_j = W_jᵀ W_j for head j's columns
    W_j of the output projection. Rows span head j's channels, and the Frobenius norm of any
    residual of the block is that of the same residual of the head's contribution through
    the projection, so the block greedy is the group-pivoted Cholesky of the Gram of the
    heads' contributions. The ridge keeps L defined with fewer tokens than channels."""
    assert mom.G is not None
    w, hd = site.width, site.head_dim
    g = mom.G[:w, :w].clone()
    g.diagonal().add_(max(ridge, 1e-10) * float(g.diagonal().mean()) + torch.finfo(g.dtype).tiny)
    chol, info = torch.linalg.cholesky_ex(g)
    if info:
        raise DgmrError(f"{site.name}: the attention output's Gram matrix is not positive definite (raise --ridge)")
    proj = site.proj.weight.detach().double().to(g.device)
    blocks = []
    for j in range(site.heads):
        cols = slice(j * hd, (j + 1) * hd)
        wtw = proj[:, cols].T @ proj[:, cols]
        wtw.diagonal().add_(1e-12 * float(wtw.diagonal().mean()) + torch.finfo(wtw.dtype).tiny)
        blocks.append(torch.linalg.cholesky(wtw).T @ chol[cols])
    return torch.stack(blocks)


def _original(site: AttentionSite) -> AttentionSite:
    """A detached copy of ``site``'s layer before its cut: the reference the refit aims at."""
    module = copy.deepcopy(site.module)
    names = {id(m): n for n, m in site.module.named_modules()}
    return dataclasses.replace(site, module=module, proj=dict(module.named_modules())[names[id(site.proj)]],
                               rows=[], norms=[], tables=[], parent=None)


def cut_heads(run: Pass, site: AttentionSite, k: int, criterion: str, seed: int,
              settings: CalibrationSettings) -> tuple[int, torch.Tensor, dict[str, Any]]:
    """Score, cut and (with compensation) refit one attention layer with passes ``run``;
    returns its head count before, the kept heads and what the refit did."""
    h, hd = site.heads, site.head_dim
    if k == h:  # nothing cut: the original layer is its own best fit
        return h, torch.arange(h), ({"rel_err_before": 0.0, "rel_err_after": 0.0, "refit": False}
                                    if settings.compensation else {})
    sliceable = not site.norms
    mom = None
    if head_criterion_scores(criterion) == "activations":
        mom = hidden_moments(run, [site])[site.name]
        keep = select_heads(site.scoring_blocks(), k, criterion, seed=seed,
                            activations=head_activations(mom, site, settings.ridge))
        mom = mom.sub(head_channels(keep, hd)) if settings.compensation and sliceable else None
    else:
        keep = select_heads(site.scoring_blocks(), k, criterion, seed=seed)
        if settings.compensation and sliceable:
            mom = hidden_moments(run, [site], cols={site.name: head_channels(keep, hd)})[site.name]
    return h, keep, cut_and_refit(run, site, keep, mom, settings, shrink_heads, _original)


class HeadStep(SiteStep):
    """An attention layer as a :class:`~dgmr.prune.calibration.sweep.Step` (``k``: the heads it keeps)."""

    site: AttentionSite

    @property
    def unit_cost(self) -> float:
        return head_cost(self.site)

    @property
    def full(self) -> int:
        return self.site.heads

    step = 1
    bounded = False  # global allocation may keep any head count from one to all (budget.py says why)

    def curve(self, mom: Moments) -> torch.Tensor:
        return head_curve(self.site, mom, self.criterion, self.seed, self.settings)

    def cut(self, run: Pass) -> tuple[int, torch.Tensor, dict[str, Any]]:
        with out_of_memory("calibrating it (its statistics, the cut and the refit)", 2 * moment_bytes(self.site),
                           layer=self.name):
            return cut_heads(run, self.site, self.k, self.criterion, self.seed, self.settings)


def head_curve(site: AttentionSite, mom: Moments, criterion: str, seed: int,
               settings: CalibrationSettings) -> torch.Tensor:
    """Relative output error of ``site`` as a function of the heads it keeps (index k = k
    heads, the criterion's first k), from the original layer's statistics."""
    h, hd = site.heads, site.head_dim
    if head_criterion_scores(criterion) == "activations":
        blocks = head_activations(mom, site, settings.ridge)
    else:
        blocks = site.scoring_blocks().double()
    order = get_head_criterion(criterion)(blocks, h, seed=seed).long().cpu()  # the full order: prefixes are picks
    channels = head_channels(order, hd)
    if settings.compensation:
        curve = compensated_curve(mom, channels, settings.ridge)
    else:
        curve = dropped_curve(mom, channels, down_coefficients(site.proj)[: site.width].T)
    return curve[::hd]


def hookable(model: nn.Module, family: Any, sites: list[AttentionSite]
             ) -> tuple[list[AttentionSite], list[tuple[nn.Module, str, nn.Module]]]:
    """The attention sites with every layer whose library forward hides its output projection
    (``nn.MultiheadAttention``) replaced by its equivalent that calls it as a module (the
    same forward at full width): calibration hooks watch that projection. Returns the sites
    found again and (parent, attribute, original module) of every replacement, for
    :func:`restore_uncut`."""
    swapped = []
    for s in sites:
        if s.hookable is None or s.refuse:
            continue
        if s.parent is None:
            raise DgmrError(f"{s.name}: calibration must replace this attention module, but it has no parent module")
        setattr(s.parent, s.attr, s.hookable(s.module))
        swapped.append((s.parent, s.attr, s.module))
    return (family.attention(model) if swapped else sites), swapped


def restore_uncut(swapped: list[tuple[nn.Module, str, nn.Module]], kept_whole: set[int]) -> None:
    """Put the library's own module back where :func:`hookable` replaced a layer that kept
    every head (the replacement holds the same parameter tensors, unchanged)."""
    for parent, attr, original in swapped:
        if id(getattr(parent, attr)) in kept_whole:
            setattr(parent, attr, original)
