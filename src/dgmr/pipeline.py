"""Typed library functions behind the CLI commands; each returns a JSON-able dict."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import check_output_dir, load, read_config, save, vision_params
from .errors import DgmrError
from .families import family_of
from .prune import prune
from .sources import Source, build_model, is_dgmr_dir, parse_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def open_model(model: str | os.PathLike, *, random_init: bool = False,
               model_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, Source | None]:
    """A model and its source from a spec (``timm:...``) or a dgmr directory."""
    if is_dgmr_dir(model):
        cfg = read_config(model)
        if cfg.get("weights_scope"):
            raise DgmrError(f"{model} holds only the vision tower ({cfg['weights_scope']!r}): open it in Python with "
                            f"dgmr.load; the dgmr commands need a whole model (prune a whole-model checkpoint)")
        return load(model), (Source.from_dict(cfg["source"]) if cfg.get("source") else None)
    if os.path.isdir(str(model)):
        raise DgmrError(f"{model} is not a dgmr model directory (use hf:{model} for a Hugging Face directory)")
    src = parse_spec(str(model), model_kwargs)
    return build_model(src, pretrained=not random_init), src


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
) -> dict[str, Any]:
    """``dgmr prune``: open ``model``, prune every vision MLP, save a dgmr directory at ``out``."""
    from .criteria import get_criterion

    get_criterion(criterion)
    if mlp_ratio is not None and not mlp_ratio > 0:
        raise DgmrError(f"--mlp-ratio must be > 0, got {mlp_ratio}")
    if dtype is not None and dtype not in DTYPES:
        raise DgmrError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_output_dir(out, overwrite)
    t0 = time.perf_counter()
    net, src = open_model(model, random_init=random_init, model_kwargs=model_kwargs)
    family = family_of(net)
    params_before = vision_params(net, family)
    net, record = prune(net, mlp_ratio=mlp_ratio, hidden=hidden, keep_fraction=keep_fraction, criterion=criterion,
                        seed=seed, progress=progress, source=src, family=family)
    if dtype is not None:
        net = net.to(DTYPES[dtype])
    params_after = vision_params(net, family)
    cfg = save(net, out, source=src, record=record, overwrite=overwrite, native=native,
               extra={"params_before": params_before, "params_after": params_after,
                      "random_init": bool(random_init)})
    widths = sorted(set(cfg["widths"].values()))
    return {
        "out": str(Path(out)),
        "model": src.spec if src else str(model),
        "family": family.name,
        "criterion": criterion,
        "mlp_layers": len(cfg["widths"]),
        "hidden_after": widths,
        "params_before": params_before,
        "params_after": params_after,
        "param_reduction": 1 - params_after / params_before,
        "native_export": cfg["native_export"].get("load", cfg["native_export"].get("skipped")),
        "seconds": round(time.perf_counter() - t0, 2),
    }
