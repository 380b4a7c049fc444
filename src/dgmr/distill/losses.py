"""The distillation objective and its schedules: feature loss, lr and weight-decay curves, and
which parameters are decayed."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# parameters AdamW does not decay besides biases and norms (ndim < 2): tokens and position embeddings
NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "reg_token", "class_embedding", "positional_embedding")


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], kind: str = "mse",
                 pooled_weight: float = 1.0, tokens_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, pooled, tokens) losses between two ``family.features`` dicts, in float32.

    ``mse``: mean squared error; ``cosine``: mean of 1 - cosine similarity per feature vector."""

    def one(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = s.float(), t.float()
        if kind == "cosine":
            return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        return F.mse_loss(s, t)

    lp = one(student["pooled"], teacher["pooled"])
    lt = one(student["tokens"], teacher["tokens"])
    return pooled_weight * lp + tokens_weight * lt, lp.detach(), lt.detach()


def lr_at(step: int, total: int, peak: float, min_lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` down to ``min_lr``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def wd_at(step: int, total: int, start: float, end: float) -> float:
    """Weight decay following a cosine from ``start`` (step 0) to ``end`` (last step)."""
    t = step / max(1, total - 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, t)))




def decay_groups(trainable: list[tuple[str, nn.Parameter]]) -> list[dict]:
    """AdamW parameter groups: weight decay (``wd_scale`` 1) on weights, none on biases, norms,
    tokens and position embeddings."""
    decay = [p for n, p in trainable if p.ndim > 1 and not n.endswith(NO_DECAY_SUFFIXES)]
    ids = {id(p) for p in decay}
    no_decay = [p for _, p in trainable if id(p) not in ids]
    groups = [{"params": decay, "wd_scale": 1.0}, {"params": no_decay, "wd_scale": 0.0}]
    return [g for g in groups if g["params"]]
