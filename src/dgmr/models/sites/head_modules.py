"""Attention modules that hold any number of heads at a fixed head dim, for layers whose
library forward cannot run once heads are cut.

* ``nn.MultiheadAttention`` (open_clip's ViT blocks) derives its head dim from its embed dim
  and checks the two agree: a cut one becomes a :class:`HeadAttention`, with the same
  parameter names (checkpoints keep their keys) and the same call and return;
* timm's ``EvaAttention`` and BEiT ``Attention`` reshape their attention output to the input
  width: a cut one is re-typed (:func:`retype_eva`, :func:`retype_beit`) to a subclass whose
  forward reshapes to its own width and otherwise runs the library's steps, with the
  library's helpers, in the library's order.

Every forward here is the original's computation at full width (tests/test_heads.py checks it).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


class HeadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` channels over an
    ``embed_dim`` model width (any ``num_heads * head_dim``): a drop-in for a cut
    ``nn.MultiheadAttention``. Parameters: ``in_proj_weight`` ([q; k; v] rows), ``in_proj_bias``,
    ``out_proj``; ``forward(query, key, value, key_padding_mask, need_weights, attn_mask,
    average_attn_weights, is_causal) -> (output, weights or None)`` as ``nn.MultiheadAttention``'s
    (a 3-D ``attn_mask`` holds one mask per batch item and head)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        width = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, embed_dim, **dd))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width, **dd)) if bias else None
        self.out_proj = nn.Linear(width, embed_dim, bias=bias, **dd)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:  # self-attention: one product, as nn.MultiheadAttention
            return list(F.linear(query, w, b).chunk(3, dim=-1))
        bs = b.chunk(3) if b is not None else (None, None, None)
        return [F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w.chunk(3), bs)]

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int,
              dtype: torch.dtype) -> torch.Tensor | None:
        """One additive mask (broadcast to (B, heads, L, S)); bool entries True mean "do not attend"."""
        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # (B * heads, L, S)
                mask = mask.view(batch, self.num_heads, *mask.shape[-2:])
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).view(batch, 1, 1, -1)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = query if key is None else key
        value = key if value is None else value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(0 if self.batch_first else 1) for x in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        if not self.batch_first:  # (L, B, E) -> (B, L, E), keeping query is key where it was
            same = query is key, key is value
            query = query.transpose(0, 1)
            key = query if same[0] else key.transpose(0, 1)
            value = key if same[1] else value.transpose(0, 1)
        q, k, v = (x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for x in self._project(query, key, value))
        batch, length = query.shape[:2]
        mask = self._mask(attn_mask, key_padding_mask, batch, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            weights = scores.softmax(dim=-1)
            x = F.dropout(weights, p, self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=is_causal and mask is None)
        x = self.out_proj(x.transpose(1, 2).reshape(batch, length, -1))
        if not self.batch_first:
            x = x.transpose(0, 1)
        if unbatched:
            x = x.squeeze(0 if self.batch_first else 1)
            weights = weights.squeeze(0) if weights is not None else None
        return x, weights


def head_attention_from(mha: nn.MultiheadAttention) -> HeadAttention:
    """``mha`` as a :class:`HeadAttention`, holding ``mha``'s own parameter tensors (no copy):
    the heads ``mha.num_heads`` and the rows of ``mha.in_proj_weight`` say (cut or not)."""
    new = HeadAttention(mha.embed_dim, mha.num_heads, mha.head_dim, bias=mha.in_proj_bias is not None,
                        batch_first=mha.batch_first, dropout=mha.dropout, device="meta")
    new.in_proj_weight = mha.in_proj_weight
    new.in_proj_bias = mha.in_proj_bias
    new.out_proj = mha.out_proj
    return new.train(mha.training)


# ---------------------------------------------------------------------------------------
# timm modules whose forward reshapes to the input width
def _attend(self: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            is_causal: bool = False) -> torch.Tensor:
    """timm's two attention paths (fused SDPA, or the explicit product with timm's mask helpers)."""
    from timm.layers import maybe_add_mask, resolve_self_attn_mask

    if self.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=self.attn_drop.p if self.training else 0.)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[-2], attn, mask, is_causal))
    return self.attn_drop(attn.softmax(dim=-1)) @ v


def _fused_qkv(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused qkv product with the module's own q/k/v biases (EVA, BEiT)."""
    if self.q_bias is None:
        return self.qkv(x)
    bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
    if getattr(self, "qkv_bias_separate", False):
        return self.qkv(x) + bias
    return F.linear(x, weight=self.qkv.weight, bias=bias)


def _eva_forward(self: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    from timm.layers import apply_rot_embed_cat

    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    if self.qkv is not None:
        q, k, v = _fused_qkv(self, x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    x = _attend(self, q, k, v, attn_mask, is_causal).transpose(1, 2).reshape(B, N, -1)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _beit_forward(self: nn.Module, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    B, N, _ = x.shape
    q, k, v = _fused_qkv(self, x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_drop.p if self.training else 0.)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + bias if bias is not None else attn
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


@functools.cache
def _retyped(cls: type, forward: Callable) -> type:
    """``cls`` with ``forward`` (one class per library class, made once)."""
    return type(f"HeadCut{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__,
                                                   "__doc__": f"{cls.__module__}.{cls.__name__} with some heads "
                                                              "removed (dgmr): the forward reshapes to its own width."})


def _retype(module: nn.Module, forward: Callable) -> nn.Module:
    cls = type(module)
    if getattr(cls, "forward", None) is not forward:
        module.__class__ = _retyped(cls, forward)
    return module


def retype_eva(module: nn.Module) -> nn.Module:
    """A cut timm ``EvaAttention``: the same module, with a forward at its own width."""
    return _retype(module, _eva_forward)


def retype_beit(module: nn.Module) -> nn.Module:
    """A cut timm BEiT ``Attention``: the same module, with a forward at its own width."""
    return _retype(module, _beit_forward)
