"""dgmr: Diversity-Guided MLP Reduction for large vision transformers (arXiv 2506.08591).

The pipeline is three packages, in order: :mod:`dgmr.prune` (score and cut the MLPs),
:mod:`dgmr.distill` (recover by feature distillation), :mod:`dgmr.evaluate` (kNN, linear
probe, zero-shot, retrieval, speed, reports); :mod:`dgmr.models` says where models come
from and how they are saved; :mod:`dgmr.cli` is the command line. The method is
docs/method.md.

``dgmr.prune`` here is the function (the public API); its package is imported by path,
e.g. ``from dgmr.prune.criteria import diversity``.
"""
__version__ = "0.1.0"

from .errors import DgmrError  # noqa: E402
from .prune.mlp import MLP_KINDS, MlpSite, find_mlps, register_mlp_kind, shrink_mlp  # noqa: E402
from .prune.criteria import CRITERIA, register_criterion, select_neurons  # noqa: E402
from .models.families import FAMILIES, Family, GenericFamily, family_of, register_family  # noqa: E402
from .models.sources import Source, build_model, parse_spec  # noqa: E402
from .models.artifact import load, save  # noqa: E402
from .models.open import open_model  # noqa: E402
from .prune import PruneRecord, prune, resolve_widths  # noqa: E402
from .prune.to_dir import prune_to_dir  # noqa: E402
from .models.importer import import_checkpoint  # noqa: E402

__all__ = [
    "__version__", "DgmrError", "CRITERIA", "register_criterion", "select_neurons", "MLP_KINDS", "MlpSite",
    "find_mlps", "register_mlp_kind", "shrink_mlp", "FAMILIES", "Family", "GenericFamily", "family_of",
    "register_family", "Source", "build_model", "parse_spec", "PruneRecord", "prune", "resolve_widths", "load",
    "save", "open_model", "prune_to_dir", "import_checkpoint",
]
