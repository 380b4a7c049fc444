"""``dgmr prune`` in memory: open a model, prune it, save a dgmr directory; and the summary
both this and the streaming prune (:mod:`.stream`) return."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..dtypes import parse_dtype
from ..models.artifact import claimed_output_dir, save
from ..models.families import Family, family_of
from ..models.open import open_model
from ..paths import data_paths, model_path
from . import prune
from .criteria import get_criterion


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
    *,
    mlp_ratio: float | None = None,
    hidden: int | None = None,
    keep_fraction: float | None = None,
    criterion: str = "diversity",
    seed: int = 0,
    random_init: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    native: bool = True,
    progress: bool = True,
    calibration: Any = None,
    calibration_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``dgmr prune``: open ``model``, prune every vision MLP, save a dgmr directory at ``out``.
    With ``calibration`` (images, see :func:`dgmr.prune`) the cut is calibrated
    (docs/calibration.md); ``calibration_settings`` are CalibrationSettings fields."""
    get_criterion(criterion)
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    inputs = [("model", model_path(model)), *(("calibration data", p) for p in data_paths(calibration))]
    with claimed_output_dir(out, inputs, overwrite):  # one writer from the emptiness check to the rename into place
        t0 = time.perf_counter()
        net, src = open_model(model, random_init=random_init, model_kwargs=model_kwargs)
        family = family_of(net)
        params_before = family.vision_params(net)
        net, record = prune(net, mlp_ratio=mlp_ratio, hidden=hidden, keep_fraction=keep_fraction, criterion=criterion,
                            seed=seed, progress=progress, source=src, family=family, calibration=calibration,
                            **(calibration_settings or {}))
        if out_dtype is not None:
            net = net.to(out_dtype)
        params_after = family.vision_params(net)
        cfg = save(net, out, source=src, record=record, overwrite=overwrite, native=native,
                   extra={"params_before": params_before, "params_after": params_after,
                          "random_init": bool(random_init)})
        extra = {"calibration": _calibration_summary(record.calibration, record.layers)} if record.calibration else {}
        return prune_summary(out, src.spec if src else str(model), family, criterion, cfg["widths"], params_before,
                             params_after, cfg["native_export"], t0, **extra)


def _calibration_summary(cal: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    """The printed gist of a calibrated prune: images, and the mean relative MLP-output error
    over the layers before and after the refit."""
    mean = lambda key: round(sum(layer.get(key, 0.0) for layer in layers) / max(len(layers), 1), 4)  # noqa: E731
    out = {"images": cal["images"], "compensate": cal["compensate"], "allocate": cal["allocate"]}
    if cal["compensate"]:
        out.update(rel_err_before=mean("rel_err_before"), rel_err_after=mean("rel_err_after"))
    return out
