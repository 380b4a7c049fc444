"""Slicing a module's tensors along one dimension, in place: what every site kind's surgery
(:mod:`.mlp`, :mod:`.attention`) is made of. Values are copied from the ORIGINAL tensors on
their own device and dtype (``meta`` included, which is how shapes are rebuilt without weights);
a Parameter stays a Parameter with its ``requires_grad``, a buffer stays a buffer."""
from __future__ import annotations

import torch
from torch import nn

# A projection: a Linear, or a 1x1 Conv2d (the same matrix applied at every pixel of an NCHW map)
Proj = nn.Linear | nn.Conv2d

# attributes that carry a norm's channel count (LayerNorm/LayerNorm2d/RmsNorm2d, BatchNorm, GroupNorm)
WIDTH_ATTRS = ("normalized_shape", "num_features", "num_channels")


def set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def take(module: nn.Module, name: str, index: torch.Tensor, dim: int = 0) -> None:
    """Keep entries ``index`` of ``module.name`` along ``dim``: a Parameter stays one, a buffer
    (persistent or not) stays one."""
    t = getattr(module, name)
    value = t.detach().index_select(dim, index.to(t.device))
    if isinstance(t, nn.Parameter):
        set_param(module, name, value)
    else:
        setattr(module, name, value.contiguous())


def take_rows(proj: Proj, rows: torch.Tensor) -> None:
    """Keep output rows (Linear) / output channels (1x1 conv: dim 0 of its weight too)."""
    rows = rows.to(proj.weight.device)
    set_param(proj, "weight", proj.weight.detach()[rows])
    if proj.bias is not None:
        set_param(proj, "bias", proj.bias.detach()[rows])
    setattr(proj, "out_features" if isinstance(proj, nn.Linear) else "out_channels", rows.numel())


def take_cols(proj: Proj, cols: torch.Tensor) -> None:
    """Keep input columns (Linear) / input channels (1x1 conv: dim 1 of its weight too)."""
    set_param(proj, "weight", proj.weight.detach()[:, cols.to(proj.weight.device)])
    setattr(proj, "in_features" if isinstance(proj, nn.Linear) else "in_channels", cols.numel())


def norm_tensors(norm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The per-channel tensors of a norm: weight, bias, BatchNorm running stats (scalars such
    as ``num_batches_tracked`` are not per channel and stay as they are)."""
    named = [*norm.named_parameters(recurse=False), *norm.named_buffers(recurse=False)]
    return [(n, t) for n, t in named if t is not None and t.ndim > 0]


def sliceable_norm(norm: nn.Module, width: int) -> bool:
    """Whether cutting ``norm`` to k channels is just slicing its per-channel tensors: every
    such tensor has shape (width,), any recorded width is ``width``, and it has no
    sub-modules (whose state we would not know how to cut)."""
    tensors = norm_tensors(norm)
    if any(tuple(t.shape) != (width,) for _, t in tensors) or any(True for _ in norm.children()):
        return False
    widths = [getattr(norm, a) for a in WIDTH_ATTRS if hasattr(norm, a)]
    if any(tuple(w) != (width,) if isinstance(w, (tuple, list, torch.Size)) else w != width for w in widths):
        return False
    return bool(tensors) or bool(widths)


def per_channel_groups(norm: nn.Module) -> bool:
    """A GroupNorm with one group per channel (instance-norm style): it stays so when cut."""
    groups = getattr(norm, "num_groups", None)
    return groups is not None and groups == getattr(norm, "num_channels", None)


def take_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    """Keep channels ``keep`` of a per-channel norm (see :func:`sliceable_norm`)."""
    k = keep.numel()
    if per_channel_groups(norm):
        norm.num_groups = k
    for name, t in norm_tensors(norm):
        if isinstance(t, nn.Parameter):
            set_param(norm, name, t.detach()[keep.to(t.device)])
        else:  # a buffer (BatchNorm running_mean / running_var): stays a buffer
            setattr(norm, name, t[keep.to(t.device)].contiguous())
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (k,)
    for attr in ("num_features", "num_channels"):
        if hasattr(norm, attr):
            setattr(norm, attr, k)
