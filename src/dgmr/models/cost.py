"""What a vision tower costs: FLOPs of one forward (``torch.utils.flop_counter``; one
multiply-add = 2 FLOPs) and the parameters of its MLPs. Meta or real weights alike."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .families import Family


def count_flops(model: nn.Module, family: Family, image_size: int, batch: int = 1) -> int:
    """FLOPs of one forward of the vision tower on ``batch`` images (meta or real weights)."""
    p = next(model.parameters())
    x = torch.zeros(batch, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        family.image_forward(model, x)
    return int(counter.get_total_flops())


def mlp_params(family: Family, model: nn.Module) -> int:
    """Parameters of the vision tower's MLPs (weights, biases, hidden-dim norms)."""
    return sum(p.numel() for s in family.mlps(model) for m in s.parts for p in m.parameters())
