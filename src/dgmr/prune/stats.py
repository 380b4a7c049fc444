"""Params and FLOPs of a vision tower before/after pruning, on the ``meta`` device.

Nothing is downloaded and no memory is spent on weights, so a 4B-parameter EVA-CLIP-E is
as cheap to count as a ViT-S. FLOPs come from ``torch.utils.flop_counter`` (one multiply-add
= 2 FLOPs) for one image.
"""
from __future__ import annotations

import os
from typing import Any

from ..core.errors import DgmrError
from ..models.cost import count_flops, mlp_params
from ..models.families import apply_widths, family_of, get_family
from ..models.open import model_source
from ..models.sources import build_model
from . import resolve_widths


def stats(
    model: str | os.PathLike,
    *,
    mlp_ratio: float | None = None,
    hidden: int | None = None,
    keep_fraction: float | None = None,
    image_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Vision-tower params and FLOPs before and after pruning to the requested width.

    ``model`` is a model spec or a dgmr directory (then "after" is that directory's widths).
    Returns ``params_before``, ``params_after``, ``param_reduction``, ``flops_before``,
    ``flops_after``, ``flop_reduction`` (reductions are fractions in [0, 1]) and more.
    """
    src, cfg = model_source(model, model_kwargs=model_kwargs)
    family = widths_from_dir = None
    if cfg is not None:
        if src is None:
            raise DgmrError(f"{model} records no model source; stats needs one")
        family = get_family(cfg["family"])
        widths_from_dir = {k: int(v) for k, v in cfg["widths"].items()}
        if any(v is not None for v in (mlp_ratio, hidden, keep_fraction)):
            raise DgmrError("a dgmr directory already has its widths; drop --mlp-ratio/--hidden/--keep-fraction")
    net = build_model(src, meta=True)
    family = family or family_of(net)
    size = image_size or family.image_size(net)
    before = {"params": family.vision_params(net), "mlp_params": mlp_params(family, net),
              "flops": count_flops(net, family, size)}
    sites = family.mlps(net)
    widths_before = [s.hidden for s in sites]
    if widths_from_dir is not None:
        apply_widths(net, widths_from_dir, family)
    elif any(v is not None for v in (mlp_ratio, hidden, keep_fraction)):
        ks = resolve_widths(sites, mlp_ratio=mlp_ratio, hidden=hidden, keep_fraction=keep_fraction)
        apply_widths(net, {s.name: k for s, k in zip(sites, ks)}, family)
    after = {"params": family.vision_params(net), "mlp_params": mlp_params(family, net),
             "flops": count_flops(net, family, size)}
    widths_after = [s.hidden for s in family.mlps(net)]
    return {
        "model": src.spec,
        "family": family.name,
        "image_size": size,
        "mlp_layers": len(sites),
        "embed_dims": sorted({s.in_features for s in sites}),
        "hidden_before": sorted(set(widths_before)),
        "hidden_after": sorted(set(widths_after)),
        "params_before": before["params"],
        "params_after": after["params"],
        "param_reduction": 1 - after["params"] / before["params"],
        "mlp_params_before": before["mlp_params"],
        "mlp_params_after": after["mlp_params"],
        "mlp_param_reduction": 1 - after["mlp_params"] / before["mlp_params"],
        "flops_before": before["flops"],
        "flops_after": after["flops"],
        "flop_reduction": 1 - after["flops"] / before["flops"],
    }
