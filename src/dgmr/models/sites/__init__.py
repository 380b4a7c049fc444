"""Site kinds: where a model's prunable structures live and the one surgery routine per kind
(MLPs: :mod:`.mlp`; attention heads: :mod:`.attention`, with :mod:`.head_modules` for layers
whose library forward cannot run with fewer heads; the slicing both use: :mod:`.slicing`)."""
from .attention import (
    ATTENTION_KINDS,
    AttentionSite,
    check_heads,
    find_attention,
    register_attention_kind,
    shrink_heads,
)
from .head_modules import HeadAttention
from .mlp import MLP_KINDS, MlpSite, check_width, find_mlps, in_dim, matrix, out_dim, register_mlp_kind, shrink_mlp

__all__ = ["ATTENTION_KINDS", "AttentionSite", "HeadAttention", "MLP_KINDS", "MlpSite", "check_heads", "check_width",
           "find_attention", "find_mlps", "in_dim", "matrix", "out_dim", "register_attention_kind", "register_mlp_kind",
           "shrink_heads", "shrink_mlp"]
