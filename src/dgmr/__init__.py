"""dgmr: Diversity-Guided MLP Reduction for large vision transformers (arXiv 2506.08591)."""
__version__ = "0.1.0"

from .errors import DgmrError  # noqa: E402
from .criteria import CRITERIA, register_criterion, select_neurons  # noqa: E402
from .mlp import MLP_KINDS, MlpSite, find_mlps, register_mlp_kind, shrink_mlp  # noqa: E402
from .families import FAMILIES, family_of, register_family  # noqa: E402
from .sources import Source, build_model, parse_spec  # noqa: E402
from .prune import PruneRecord, prune, resolve_widths  # noqa: E402
from .artifact import load, save  # noqa: E402
from .pipeline import open_model, prune_to_dir  # noqa: E402

__all__ = [
    "__version__", "DgmrError", "CRITERIA", "register_criterion", "select_neurons", "MLP_KINDS", "MlpSite",
    "find_mlps", "register_mlp_kind", "shrink_mlp", "FAMILIES", "family_of", "register_family", "Source",
    "build_model", "parse_spec", "PruneRecord", "prune", "resolve_widths", "load", "save",
    "open_model", "prune_to_dir",
]
