"""Model families: one adapter per library (timm, open_clip, transformers) + the generic fallback.

Importing this package registers the built-in families; :func:`family_of` picks the adapter
of a model (user-registered families first, :class:`GenericFamily` last).
"""
from .base import (
                   FAMILIES,
                   HEAD_EXCLUDE,
                   IMAGENET_MEAN,
                   IMAGENET_STD,
                   NoSequentialBlocks,
                   OPENAI_CLIP_MEAN,
                   OPENAI_CLIP_STD,
                   Family,
                   GenericFamily,
                   apply_heads,
                   apply_widths,
                   family_of,
                   get_family,
                   ratio_for,
                   register_family,
                   site_widths,
)
from .hf import HFFamily
from .open_clip import OpenClipFamily
from .timm import TimmFamily

__all__ = [
    "FAMILIES", "HEAD_EXCLUDE", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "Family",
    "GenericFamily", "HFFamily", "NoSequentialBlocks", "OpenClipFamily", "TimmFamily", "apply_heads", "apply_widths",
    "family_of", "get_family", "ratio_for", "register_family", "site_widths",
]
