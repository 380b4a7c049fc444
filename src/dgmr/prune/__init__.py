"""Prune: score every MLP of a vision tower and cut it to the requested width.

``dgmr.prune`` (this package's :func:`prune`, re-exported at the top level) works on a model
in memory; :mod:`.to_dir` opens and saves (``dgmr prune``), :mod:`.stream` prunes checkpoints
too big for memory, :mod:`.criteria` scores neurons (with the kernel in :mod:`.pivot`),
:mod:`.mlp` finds MLPs and cuts them, :mod:`.stats` counts params and FLOPs. The method is
docs/method.md.
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
from ..models.sites.mlp import MlpSite, check_width, shrink_mlp
from ..models.sources import Source
from .calibration.cut import calibrated_prune
from .calibration.settings import CalibrationSettings
from .criteria import criterion_scores, select_neurons


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
    **calibration_settings: Any,
) -> tuple[nn.Module, PruneRecord]:
    """Prune the hidden layer of every MLP of ``model``'s vision tower, in place.

    Returns ``(model, record)``: the same model object (same class, same forward, smaller
    MLPs) and a :class:`PruneRecord` with the per-layer kept indices. Without calibration,
    selection uses the original weights of each layer and the kept rows/columns are copied
    from them unchanged (the paper's method).

    ``calibration``: unlabeled images (a folder, a list file, WebDataset shards, a list of
    PIL images, a Dataset, or preprocessed (N, 3, H, W) batches / a DataLoader). With it the
    cut MLPs' down projections are refitted to the original outputs, and activation criteria
    (``diversity-act``) can score; ``calibration_settings`` are the fields of
    :class:`~dgmr.prune.calibration.settings.CalibrationSettings`, named as ``dgmr prune``'s
    flags (``calibration_images``, ``compensation``, ``allocate``, ``ridge``, ...; the older
    names ``images``, ``compensate``... still work). docs/calibration.md. Calibration runs every image once
    before the first cut and refuses, leaving the model whole, what it cannot calibrate;
    an error after that (out of memory, say) leaves the model partly pruned.
    """
    settings = CalibrationSettings.from_keywords("prune", **calibration_settings)
    family = family or family_of(model)
    sites = family.mlps(model)
    ks = resolve_widths(sites, mlp_ratio=mlp_ratio, hidden=hidden, keep_fraction=keep_fraction, widths=widths)
    record = PruneRecord.start(criterion, seed, mlp_ratio=mlp_ratio, hidden=hidden, keep_fraction=keep_fraction)
    if calibration is not None:
        if not settings.compensation and settings.allocate == "uniform" and criterion_scores(criterion) == "weights":
            raise DgmrError(f"calibration changes nothing here: no compensation, uniform widths and {criterion!r} "
                            "scores weights; drop the calibration images, or compensate, allocate globally or "
                            "use an activation criterion")
        calibrated_prune(model, family, sites, ks, record, calibration, settings, criterion=criterion, seed=seed,
                         progress=progress, source=source)
        record.config_updates = family.update_config(model, source)
        return model, record
    if calibration_settings:
        raise DgmrError(f"{', '.join(sorted(calibration_settings))}: calibration settings need calibration images "
                        "(calibration=...)")
    # an activation criterion without calibration: select_neurons refuses at the first MLP, before any cut
    bar = tqdm(list(zip(sites, ks)), desc=f"prune ({criterion})", unit="layer", disable=not progress, leave=False)
    for i, (site, k) in enumerate(bar):
        w1, w_gate = site.scoring_weights()
        h = site.hidden
        with torch.no_grad(), out_of_memory(f"cutting it to {k}", 2 * w1.numel() * w1.element_size(), layer=site.name):
            keep = select_neurons(w1, k, criterion, w_gate=w_gate, seed=seed + i)
            shrink_mlp(site, keep)
        record.add(site, h, keep)
    record.config_updates = family.update_config(model, source)
    return model, record
