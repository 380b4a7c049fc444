"""Params and FLOPs of a vision tower before/after pruning, on the ``meta`` device.

Nothing is downloaded and no memory is spent on weights, so a 4B-parameter EVA-CLIP-E is
as cheap to count as a ViT-S. FLOPs come from ``torch.utils.flop_counter`` (one multiply-add
= 2 FLOPs) for one image.
"""
from __future__ import annotations

import os
from typing import Any

from ..core.errors import DgmrError
from ..models.cost import attention_params, count_flops, mlp_params
from ..models.families import apply_heads, apply_widths, family_of, get_family
from ..models.open import model_source
from ..models.sources import build_model
from . import resolve_heads, resolve_widths


def stats(
    model: str | os.PathLike,
    *,
    mlp_ratio: float | None = None,
    hidden: int | None = None,
    keep_fraction: float | None = None,
    heads: int | None = None,
    head_fraction: float | None = None,
    image_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Vision-tower params and FLOPs before and after pruning to the requested width and
    attention heads (``heads`` per layer or ``head_fraction``).

    ``model`` is a model spec or a dgmr directory (then "after" is that directory's widths and
    heads). Returns ``params_before``, ``params_after``, ``param_reduction``, ``flops_before``,
    ``flops_after``, ``flop_reduction`` (reductions are fractions in [0, 1]) and more.
    """
    src, cfg = model_source(model, model_kwargs=model_kwargs)
    family = widths_from_dir = None
    heads_from_dir: dict[str, int] = {}
    cut_heads = heads is not None or head_fraction is not None
    if cfg is not None:
        if src is None:
            raise DgmrError(f"{model} records no model source; stats needs one")
        family = get_family(cfg["family"])
        widths_from_dir = {k: int(v) for k, v in cfg["widths"].items()}
        heads_from_dir = {k: int(v) for k, v in (cfg.get("heads") or {}).items()}
        if any(v is not None for v in (mlp_ratio, hidden, keep_fraction, heads, head_fraction)):
            raise DgmrError("a dgmr directory already has its widths and heads; drop --mlp-ratio/--hidden/"
                            "--keep-fraction/--heads/--head-fraction")
    net = build_model(src, meta=True)
    family = family or family_of(net)
    size = image_size or family.image_size(net)
    before = {"params": family.vision_params(net), "mlp_params": mlp_params(family, net),
              "attention_params": attention_params(family, net), "flops": count_flops(net, family, size)}
    sites = family.mlps(net)
    attention = family.attention(net)
    widths_before, heads_before = [s.hidden for s in sites], [s.heads for s in attention]
    hs = resolve_heads(attention, heads=heads, head_fraction=head_fraction, model=src.spec) if cut_heads else []
    if widths_from_dir is not None:
        apply_heads(net, heads_from_dir, family)
        apply_widths(net, widths_from_dir, family)
    elif any(v is not None for v in (mlp_ratio, hidden, keep_fraction)):
        ks = resolve_widths(sites, mlp_ratio=mlp_ratio, hidden=hidden, keep_fraction=keep_fraction)
        apply_widths(net, {s.name: k for s, k in zip(sites, ks)}, family)
    apply_heads(net, {s.name: k for s, k in zip(attention, hs)}, family)
    after = {"params": family.vision_params(net), "mlp_params": mlp_params(family, net),
             "attention_params": attention_params(family, net), "flops": count_flops(net, family, size)}
    widths_after = [s.hidden for s in family.mlps(net)]
    heads_after = [s.heads for s in family.attention(net)]
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
        "attention_layers": len(attention),
        "heads_before": sorted(set(heads_before)),
        "heads_after": sorted(set(heads_after)),
        "attention_params_before": before["attention_params"],
        "attention_params_after": after["attention_params"],
        "flops_before": before["flops"],
        "flops_after": after["flops"],
        "flop_reduction": 1 - after["flops"] / before["flops"],
    }
