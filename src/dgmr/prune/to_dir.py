"""``dgmr prune`` in memory: open a model, prune it, save a dgmr directory; and the summary
both this and the streaming prune (:mod:`.stream`) return."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ..core.dtypes import parse_dtype
from ..data.unlabeled import data_paths
from ..io.output import claimed_output_dir
from ..models.artifact import save
from ..models.families import Family, family_of
from ..models.open import model_path, open_model
from . import prune
from .criteria import get_criterion
from .head_criteria import get_head_criterion
from .settings import PruneSettings


def prune_summary(out: str | os.PathLike, model: str, family: Family, criterion: str, widths: dict[str, int],
                  params_before: int, params_after: int, native: dict[str, Any], t0: float,
                  **extra: Any) -> dict[str, Any]:
    """What ``dgmr prune`` prints (and returns) for an output directory."""
    return {
        "out": str(Path(out)),
        "model": model,
        "family": family.name,
        "criterion": criterion,
        "mlp_layers": len(widths),
        "hidden_after": sorted(set(widths.values())),
        "params_before": params_before,
        "params_after": params_after,
        "param_reduction": 1 - params_after / params_before if params_before else 0.0,
        **extra,
        "native_export": native.get("load", native.get("skipped")),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def prune_to_dir(
    model: str | os.PathLike,
    out: str | os.PathLike,
    settings: PruneSettings | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    calibration: Any = None,
    calibration_settings: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``dgmr prune``: open ``model``, prune every vision MLP, save a dgmr directory at ``out``.

    ``settings`` (a :class:`~dgmr.prune.settings.PruneSettings`) or its fields as keywords
    (``mlp_ratio=1.0, criterion="l2"``...) say what to do. With ``calibration`` (images, see
    :func:`dgmr.prune`) the cut is calibrated (docs/calibration.md); ``calibration_settings``
    are :class:`~dgmr.prune.calibration.settings.CalibrationSettings` fields."""
    s = PruneSettings.from_keywords(settings, "prune_to_dir", **kwargs)
    get_criterion(s.criterion)
    if s.heads_given or s.params_fraction is not None:
        get_head_criterion(s.criterion)
    out_dtype = parse_dtype(s.dtype) if s.dtype is not None else None
    inputs = [("model", model_path(model)), *(("calibration data", p) for p in data_paths(calibration))]
    with claimed_output_dir(out, inputs, s.overwrite):  # one writer from the emptiness check to the rename into place
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # --random-init weights come from --seed: the same command, the same model
            torch.manual_seed(s.seed)
            net, src = open_model(model, random_init=s.random_init, model_kwargs=model_kwargs)
        family = family_of(net)
        params_before = family.vision_params(net)
        net, record = prune(net, **s.widths(), **s.head_counts(), params_fraction=s.params_fraction,
                            criterion=s.criterion, seed=s.seed,
                            progress=progress, source=src,
                            family=family, calibration=calibration, **(calibration_settings or {}))
        if out_dtype is not None:
            net = net.to(out_dtype)
        params_after = family.vision_params(net)
        cfg = save(net, out, source=src, record=record, overwrite=s.overwrite, native=s.native,
                   extra={"params_before": params_before, "params_after": params_after,
                          "random_init": bool(s.random_init), **({"random_init_seed": s.seed} if s.random_init else {})})
        extra = {"calibration": _calibration_summary(record.calibration, record.layers, record.heads)} if record.calibration else {}
        if record.heads:
            extra["heads_after"] = sorted(set(record.head_counts.values()))
        return prune_summary(out, src.spec if src else str(model), family, s.criterion, cfg["widths"], params_before,
                             params_after, cfg["native_export"], t0, **extra)


def _calibration_summary(cal: dict[str, Any], layers: list[dict[str, Any]],
                         heads: list[dict[str, Any]]) -> dict[str, Any]:
    """The printed gist of a calibrated prune: images, and the mean relative output error of
    the MLPs (and of the attention layers whose heads were cut) before and after the refit."""
    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return round(sum(row.get(key, 0.0) for row in rows) / max(len(rows), 1), 4)

    out = {"images": cal["images"], "compensate": cal["compensate"], "allocate": cal["allocate"],
           **({"params_target": cal["params_target"]} if "params_target" in cal else {})}
    if cal["compensate"] and layers:
        out.update(rel_err_before=mean(layers, "rel_err_before"), rel_err_after=mean(layers, "rel_err_after"))
    if cal["compensate"] and heads:
        out.update(heads_rel_err_before=mean(heads, "rel_err_before"), heads_rel_err_after=mean(heads, "rel_err_after"))
    return out
