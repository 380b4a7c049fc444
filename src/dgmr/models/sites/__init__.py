"""Site kinds: where a model's prunable structures live and the one surgery routine per kind (MLPs: :mod:`.mlp`)."""
from .mlp import MLP_KINDS, MlpSite, check_width, find_mlps, in_dim, matrix, out_dim, register_mlp_kind, shrink_mlp

__all__ = ["MLP_KINDS", "MlpSite", "check_width", "find_mlps", "in_dim", "matrix", "out_dim", "register_mlp_kind",
           "shrink_mlp"]
