"""What a vision tower costs: FLOPs of one forward (``torch.utils.flop_counter``; one
multiply-add = 2 FLOPs) and the parameters of its MLPs and attention layers. Meta or real
weights alike, on any device.

torch's counter knows the CUDA attention kernels (flash, memory-efficient, cuDNN) and the
plain matrix products, but not the fused CPU attention kernel nor ``nn.MultiheadAttention``'s
fused inference path: on the CPU it counted neither the attention matmuls (q @ k^T, attn @ v)
nor, for open_clip, the projections around them, while the same forward on ``meta`` runs the
plain products and counted them. :data:`ATTENTION_FLOPS` counts those kernels explicitly, so
a model's FLOPs are the same whatever device it is counted on.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .families import Family

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """q @ k^T and attn @ v, as torch counts its CUDA attention kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _mha_flops(query_shape, key_shape, value_shape, embed_dim: int, num_heads: int, qkv_weight_shape,
               qkv_bias_shape, proj_weight_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """``nn.MultiheadAttention``'s fused inference kernel: the q, k, v projections, the attention
    matmuls and the output projection ((B, L, E) inputs, or (L, E) unbatched)."""
    q = (1, *query_shape) if len(query_shape) == 2 else tuple(query_shape)
    k = (1, *key_shape) if len(key_shape) == 2 else tuple(key_shape)
    b, lq, e = q
    lk = k[1]
    width = qkv_weight_shape[0] // 3
    hd = width // num_heads
    projections = 2 * b * (lq + 2 * lk) * e * width + 2 * b * lq * width * proj_weight_shape[0]
    heads = (b, num_heads, lq, hd), (b, num_heads, lk, hd)
    return projections + sdpa_flop_count(heads[0], heads[1], heads[1])


ATTENTION_FLOPS = {op: fn for op, fn in (
    (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), _sdpa_flops),
    (getattr(aten, "_scaled_dot_product_fused_attention_overrideable", None), _sdpa_flops),
    (getattr(aten, "_native_multi_head_attention", None), _mha_flops),
) if op is not None}


def count_flops(model: nn.Module, family: Family, image_size: int, batch: int = 1) -> int:
    """FLOPs of one forward of the vision tower on ``batch`` images (meta or real weights, any device)."""
    p = next(model.parameters())
    x = torch.zeros(batch, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
    with torch.no_grad(), counter:
        family.image_forward(model, x)
    return int(counter.get_total_flops())


def mlp_params(family: Family, model: nn.Module) -> int:
    """Parameters of the vision tower's MLPs (weights, biases, hidden-dim norms)."""
    return sum(p.numel() for s in family.mlps(model) for m in s.parts for p in m.parameters())


def attention_params(family: Family, model: nn.Module) -> int:
    """Parameters of the vision tower's attention layers dgmr can cut (q, k, v, gate, output
    projection, width norms, per-head tables; 0 without any)."""
    return sum(p.numel() for s in family.attention(model) for p in s.module.parameters())
