"""dgmr: Diversity-Guided MLP Reduction for large vision transformers (arXiv 2506.08591).

The packages are layers; imports only point down (checked by import-linter, see
pyproject.toml): :mod:`dgmr.cli` and :mod:`dgmr.demo` on top; :mod:`dgmr.report` (tables and
plots); the pipeline, :mod:`dgmr.prune` (score and cut), :mod:`dgmr.distill` (recover by
feature distillation) and :mod:`dgmr.evaluate` (kNN, linear probe, zero-shot, retrieval,
speed), which do not import each other; :mod:`dgmr.models` (where models come from, their
families and prunable sites, how they are saved) and :mod:`dgmr.data` (images); :mod:`dgmr.io`
(files in and out); :mod:`dgmr.core` (errors, registries, settings, dtypes, process groups).
This module is the public API on top of them all: nothing inside dgmr imports it. The method
is docs/method.md.

``dgmr.prune`` here is the function (the public API); its package is imported by path,
e.g. ``from dgmr.prune.criteria import diversity``.
"""
from .core.errors import DgmrError
from .core.version import __version__
from .models.artifact import load, save
from .models.families import FAMILIES, Family, GenericFamily, family_of, register_family
from .models.open import open_model
from .models.record import PruneRecord
from .models.sites.attention import ATTENTION_KINDS, AttentionSite, find_attention, register_attention_kind, shrink_heads
from .models.sites.mlp import MLP_KINDS, MlpSite, find_mlps, register_mlp_kind, shrink_mlp
from .models.sources import Source, build_model, parse_spec
from .prune import prune, resolve_heads, resolve_widths
from .prune.criteria import CRITERIA, register_criterion, select_neurons
from .prune.head_criteria import HEAD_CRITERIA, register_head_criterion, select_heads
from .prune.importer import import_checkpoint
from .prune.to_dir import prune_to_dir

__all__ = [
    "__version__", "DgmrError", "CRITERIA", "register_criterion", "select_neurons", "MLP_KINDS", "MlpSite",
    "find_mlps", "register_mlp_kind", "shrink_mlp", "FAMILIES", "Family", "GenericFamily", "family_of",
    "register_family", "Source", "build_model", "parse_spec", "PruneRecord", "prune", "resolve_widths", "load",
    "save", "open_model", "prune_to_dir", "import_checkpoint", "ATTENTION_KINDS", "AttentionSite", "find_attention",
    "register_attention_kind", "shrink_heads", "HEAD_CRITERIA", "register_head_criterion", "select_heads",
    "resolve_heads",
]
