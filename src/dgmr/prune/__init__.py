"""Prune: score every MLP of a vision tower and cut it to the requested width; optionally
remove whole attention heads too (``heads=``/``head_fraction=``).

``dgmr.prune`` (this package's :func:`prune`, re-exported at the top level) works on a model
in memory; :mod:`.to_dir` opens and saves (``dgmr prune``), :mod:`.stream` prunes checkpoints
too big for memory, :mod:`.criteria` scores neurons (with the kernel in :mod:`.pivot`),
:mod:`.head_criteria` scores attention heads, :mod:`dgmr.models.sites` finds MLPs and
attention layers and cuts them, :mod:`.stats` counts params and FLOPs. The method is
docs/method.md; attention heads are docs/heads.md.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import DgmrError
from ..core.memory import out_of_memory
from ..models.families import Family, family_of
from ..models.record import PruneRecord
from ..models.sites.attention import ATTENTION_KINDS, AttentionSite, check_heads, shrink_heads
from ..models.sites.mlp import MlpSite, check_width, shrink_mlp
from ..models.sources import Source
from .calibration.cut import calibrated_prune
from .calibration.settings import CalibrationSettings
from .criteria import criterion_scores, select_neurons
from .head_criteria import get_head_criterion, head_criterion_scores, select_heads


def resolve_widths(
    sites: Sequence[MlpSite],
    *,
    mlp_ratio: float | None = None,
    hidden: int | None = None,
    keep_fraction: float | None = None,
    widths: Mapping[str, int] | Sequence[int] | None = None,
) -> list[int]:
    """Target width per MLP. Exactly one of: ``mlp_ratio`` r (k = round(r * d), the paper's
    convention), absolute ``hidden``, ``keep_fraction`` of the current width, or per-layer
    ``widths`` (a name -> k map or a list in layer order). Validates 0 < k <= current."""
    given = [n for n, v in (("mlp_ratio", mlp_ratio), ("hidden", hidden), ("keep_fraction", keep_fraction),
                            ("widths", widths)) if v is not None]
    if len(given) != 1:
        raise DgmrError("give exactly one of mlp_ratio, hidden, keep_fraction, widths" +
                        (f" (got {', '.join(given)})" if given else ""))
    if mlp_ratio is not None:
        if not (math.isfinite(mlp_ratio) and mlp_ratio > 0):
            raise DgmrError(f"mlp ratio must be > 0 and finite, got {mlp_ratio}")
        ks = [int(round(mlp_ratio * s.in_features)) for s in sites]
    elif hidden is not None:
        ks = [int(hidden)] * len(sites)
    elif keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise DgmrError(f"keep fraction must be in (0, 1], got {keep_fraction}")
        ks = [max(1, int(round(keep_fraction * s.hidden))) for s in sites]
    elif isinstance(widths, Mapping):
        names = {s.name for s in sites}
        unknown = sorted(set(widths) - names)
        if unknown:
            raise DgmrError(f"widths name unknown MLP {unknown[0]!r}; MLPs are e.g. {sites[0].name!r}")
        ks = [int(widths.get(s.name, s.hidden)) for s in sites]
    else:
        ks = [int(w) for w in widths]
        if len(ks) != len(sites):
            raise DgmrError(f"got {len(ks)} widths for {len(sites)} MLPs")
    for s, k in zip(sites, ks):
        if not 0 < k <= s.hidden:
            raise DgmrError(f"{s.name}: cannot keep {k} of {s.hidden} hidden neurons (need 0 < k <= {s.hidden}); "
                            f"an mlp ratio of at most {s.hidden / s.in_features:g} fits this model")
        check_width(s, k)  # every width is checked before the first cut: a refusal leaves the model whole
    return ks


def resolve_heads(
    sites: Sequence[AttentionSite],
    *,
    heads: int | Mapping[str, int] | Sequence[int] | None = None,
    head_fraction: float | None = None,
    model: str = "the model",
) -> list[int]:
    """Heads to keep per attention layer. Exactly one of: ``heads`` N per layer (or a name -> N
    map, or a list in layer order), or ``head_fraction`` F (round(F * heads) per layer, halves up).
    Validates every count, and refuses layouts that cannot be cut, before any cut."""
    given = [n for n, v in (("heads", heads), ("head_fraction", head_fraction)) if v is not None]
    if len(given) != 1:
        raise DgmrError("give exactly one of heads, head_fraction" + (f" (got {', '.join(given)})" if given else ""))
    if not sites:
        raise DgmrError(f"attention heads were asked for, but {model} has no attention layer dgmr recognises (known "
                        f"kinds: {', '.join(ATTENTION_KINDS)}, or a module named *attn/*attention with num_heads, "
                        "qkv or q/k/v projections and an output projection; see register_attention_kind)")
    if head_fraction is not None:
        if not (math.isfinite(head_fraction) and 0 < head_fraction <= 1):
            raise DgmrError(f"head fraction must be in (0, 1], got {head_fraction}")
        ks = [math.floor(head_fraction * s.heads + 0.5) for s in sites]  # halves round up
        zero = next((s for s, k in zip(sites, ks) if k == 0), None)
        if zero is not None:
            raise DgmrError(f"{zero.name}: a head fraction of {head_fraction:g} keeps round({head_fraction:g} x "
                            f"{zero.heads}) = 0 of its {zero.heads} heads; keep at least one (a fraction >= "
                            f"{0.5 / zero.heads:.3g})")
    elif isinstance(heads, Mapping):
        unknown = sorted(set(heads) - {s.name for s in sites})
        if unknown:
            raise DgmrError(f"heads name unknown attention layer {unknown[0]!r}; attention layers are e.g. "
                            f"{sites[0].name!r}")
        ks = [heads.get(s.name, s.heads) for s in sites]
    elif isinstance(heads, Sequence):
        ks = list(heads)
        if len(ks) != len(sites):
            raise DgmrError(f"got {len(ks)} head counts for {len(sites)} attention layers")
    else:
        ks = [heads] * len(sites)
    for s, k in zip(sites, ks):
        check_heads(s, k)  # every count is checked before the first cut: a refusal leaves the model whole
    return ks


def _head_request(model: nn.Module, family: Family, criterion: str, heads: Any, head_fraction: float | None,
                  calibrated: bool, free: bool = False) -> tuple[list[AttentionSite], list[Any]]:
    """The attention layers and their head counts, every check done (counts, layouts, criterion).
    ``free`` without counts: each is None, for params_fraction to decide (except where heads
    cannot be cut: all kept)."""
    attention = family.attention(model)
    if free and heads is None and head_fraction is None:
        hs: list[Any] = [s.heads if s.refuse else None for s in attention]
        if any(h is None for h in hs):
            get_head_criterion(criterion)  # a neuron-only criterion cannot size heads: refused before any pass
    else:
        hs = resolve_heads(attention, heads=heads, head_fraction=head_fraction, model=type(model).__name__)
    if head_criterion_scores(criterion) == "activations" and not calibrated:
        raise DgmrError(f"head criterion {criterion!r} scores activations: it needs calibration images "
                        "(calibration=...)")
    return attention, hs


def _check_budget(params_fraction: float, settings: CalibrationSettings, calibrated: bool) -> None:
    """Refuse a ``params_fraction`` that cannot be spent, before anything is cut: it is spent by
    measured error, which takes calibration images and global allocation."""
    if not (math.isfinite(params_fraction) and 0 < params_fraction < 1):
        raise DgmrError(f"params fraction must be in (0, 1), got {params_fraction}")
    if not calibrated or settings.allocate != "global":
        raise DgmrError("params_fraction spends the parameters across MLP neurons and attention heads by their "
                        "measured error on calibration images: give calibration images and allocate='global' "
                        "(dgmr prune --calibration DATA --allocate global)")


def _cut_mlps(sites: Sequence[MlpSite], ks: Sequence[int], record: PruneRecord, criterion: str, seed: int,
              progress: bool) -> None:
    """Score (weights only) and cut every MLP to its width; fills ``record``. An activation
    criterion without calibration: select_neurons refuses at the first MLP, before any cut."""
    bar = tqdm(list(zip(sites, ks)), desc=f"prune ({criterion})", unit="layer", disable=not progress, leave=False)
    for i, (site, k) in enumerate(bar):
        w1, w_gate = site.scoring_weights()
        h = site.hidden
        with torch.no_grad(), out_of_memory(f"cutting it to {k}", 2 * w1.numel() * w1.element_size(), layer=site.name):
            keep = select_neurons(w1, k, criterion, w_gate=w_gate, seed=seed + i)
            shrink_mlp(site, keep)
        record.add(site, h, keep)


def _cut_heads(sites: Sequence[AttentionSite], ks: Sequence[int], record: PruneRecord, criterion: str, seed: int,
               progress: bool) -> None:
    """Score (weights only) and cut every attention layer to its head count; fills ``record``."""
    bar = tqdm(list(zip(sites, ks)), desc=f"heads ({criterion})", unit="layer", disable=not progress, leave=False)
    for i, (site, k) in enumerate(bar):
        h = site.heads
        # the head blocks, copied and scored in float64: about twice the q/k/v weights in 8-byte floats
        scored = sum(t.numel() for t in (getattr(owner, name) for owner, name, _ in site.rows) if t.ndim == 2)
        with torch.no_grad(), out_of_memory(f"cutting it to {k} heads", 2 * 8 * scored, layer=site.name):
            keep = torch.arange(h) if k == h else select_heads(site.scoring_blocks(), k, criterion, seed=seed + i)
            if k != h:
                shrink_heads(site, keep)
        record.add_heads(site, h, keep)


def prune(
    model: nn.Module,
    mlp_ratio: float | None = None,
    hidden: int | None = None,
    keep_fraction: float | None = None,
    widths: Mapping[str, int] | Sequence[int] | None = None,
    criterion: str = "diversity",
    *,
    seed: int = 0,
    progress: bool = True,
    source: Source | None = None,
    family: Family | None = None,
    calibration: Any = None,
    heads: int | Mapping[str, int] | Sequence[int] | None = None,
    head_fraction: float | None = None,
    params_fraction: float | None = None,
    **calibration_settings: Any,
) -> tuple[nn.Module, PruneRecord]:
    """Prune the hidden layer of every MLP of ``model``'s vision tower, and/or remove whole
    attention heads, in place.

    Returns ``(model, record)``: the same model object (same class, same forward, smaller
    MLPs) and a :class:`PruneRecord` with the per-layer kept indices. Without calibration,
    selection uses the original weights of each layer and the kept rows/columns are copied
    from them unchanged (the paper's method).

    ``heads`` (N per attention layer, a name -> N map or a list) or ``head_fraction`` (keep
    round(F x heads) per layer) also removes whole attention heads, chosen by the head
    criterion of the same name (``diversity``, ``l2``, ``random``: weights only; see
    :mod:`dgmr.prune.head_criteria`); the MLP width is then optional. Heads keep their head
    dim (docs/heads.md). Every MLP width and head count is checked before the first cut.

    ``params_fraction`` F (with calibration and ``allocate="global"``) keeps fraction F of the
    vision tower's parameters, spent on MLP neurons and heads by measured error per parameter;
    widths or head counts given beside it stay as given (docs/heads.md, "One budget").

    ``calibration``: unlabeled images (a folder, a list file, WebDataset shards, a list of
    PIL images, a Dataset, or preprocessed (N, 3, H, W) batches / a DataLoader). With it the
    cut MLPs' down projections are refitted to the original outputs, and activation criteria
    (``diversity-act``, for neurons and heads) can score; cut attention layers get their output
    projections refitted the same way; ``calibration_settings`` are the fields of
    :class:`~dgmr.prune.calibration.settings.CalibrationSettings`, named as ``dgmr prune``'s
    flags (``calibration_images``, ``compensation``, ``allocate``, ``ridge``, ...; the older
    names ``images``, ``compensate``... still work). docs/calibration.md. Calibration runs every image once
    before the first cut and refuses, leaving the model whole, what it cannot calibrate;
    an error after that (out of memory, say) leaves the model partly pruned.
    """
    settings = CalibrationSettings.from_keywords("prune", **calibration_settings)
    family = family or family_of(model)
    calibrated = calibration is not None
    cut_heads = heads is not None or head_fraction is not None
    width_given = any(v is not None for v in (mlp_ratio, hidden, keep_fraction, widths))
    if params_fraction is not None:
        _check_budget(params_fraction, settings, calibrated)
    sites = family.mlps(model) if width_given or not cut_heads or params_fraction is not None else []
    ks: list[Any] = [None] * len(sites)  # free: params_fraction sizes them
    if width_given or not (cut_heads or params_fraction is not None):
        ks = resolve_widths(sites, mlp_ratio=mlp_ratio, hidden=hidden, keep_fraction=keep_fraction, widths=widths)
    attention, hs = _head_request(model, family, criterion, heads, head_fraction, calibrated,
                                  free=params_fraction is not None) if cut_heads or params_fraction is not None \
        else ([], [])
    record = PruneRecord.start(criterion, seed, mlp_ratio=mlp_ratio, hidden=hidden, keep_fraction=keep_fraction,
                               heads=heads, head_fraction=head_fraction, params_fraction=params_fraction)
    if calibrated:
        if not settings.compensation and settings.allocate == "uniform" and criterion_scores(criterion) == "weights":
            raise DgmrError(f"calibration changes nothing here: no compensation, uniform widths and {criterion!r} "
                            "scores weights; drop the calibration images, or compensate, allocate globally or "
                            "use an activation criterion")
        calibrated_prune(model, family, sites, ks, record, calibration, settings, criterion=criterion, seed=seed,
                         progress=progress, source=source, attention=attention, hs=hs,
                         params_fraction=params_fraction)
        record.config_updates = family.update_config(model, source)
        return model, record
    if calibration_settings:
        raise DgmrError(f"{', '.join(sorted(calibration_settings))}: calibration settings need calibration images "
                        "(calibration=...)")
    _cut_mlps(sites, ks, record, criterion, seed, progress)
    _cut_heads(attention, hs, record, criterion, seed, progress)
    record.config_updates = family.update_config(model, source)
    return model, record
