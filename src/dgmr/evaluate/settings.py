"""Evaluation settings: typed dataclasses whose fields are at once the ``dgmr eval`` flags
(:mod:`dgmr.cli.eval` generates them) and the keywords of :func:`~dgmr.evaluate.eval_knn`,
:func:`~dgmr.evaluate.eval_linear`, :func:`~dgmr.evaluate.eval_zeroshot`,
:func:`~dgmr.evaluate.eval_retrieval` and :func:`~dgmr.evaluate.eval_speed`; a setting and
its default are declared here only.

* :class:`ModelSettings`: how a model is opened and run (every command);
* :class:`FeatureSettings`: what every feature-extracting protocol shares (batching, cache,
  preprocessing, the result's labels);
* :class:`KnnSettings`, :class:`LinearSettings`, :class:`ZeroshotSettings`,
  :class:`RetrievalSettings`, :class:`SpeedSettings`: one protocol's own settings.

A field whose metadata says ``cli=False`` (``progress``, ``text_batch_size``) is a Python
keyword only. Validation lives in ``__post_init__`` and words its errors with the flags'
names, so a wrong value is one ``DgmrError`` before any model is opened.
:func:`resolve` turns an eval function's keywords into these objects: the older Python
keywords (:data:`ALIASES`) keep working and a misspelt one is a ``TypeError``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..core.dtypes import DTYPES
from ..core.errors import DgmrError
from ..core.settings import names, setting, unknown_keyword
from .knn import DEFAULT_KS
from .linear import DEFAULT_WEIGHT_DECAYS
from .linear import PROTOCOLS as LINEAR_PROTOCOLS
from .retrieval import TIE_MODES, check_options

# keywords the Python functions took before they took the CLI's names: old -> field
ALIASES = {"num_workers": "workers", "val_fraction": "held_out", "ks": "k", "labels": "label"}


def comma_names(text: str) -> list[str] | None:
    """``--label a,b`` -> ["a", "b"] (empty text: no labels)."""
    return text.split(",") if text else None


@dataclass
class ModelSettings:
    """How the model is opened and run: shared by every ``dgmr eval`` command."""

    random_init: bool = setting(False, "build the architecture with random weights (no download)")
    seed: int = setting(0, "seed of the --random-init weights (the same command, the same model; linear: also of "
                           "the held-out split and the clip_benchmark probe)")
    model_kwargs: dict[str, Any] | None = setting(
        None, "extra architecture arguments (timm create_model kwargs, open_clip create_model kwargs, HF config "
              "overrides), e.g. '{\"img_size\": 64}'", metavar="JSON")
    image_size: int | None = setting(None, "input resolution (default: the model's own)")
    device: str | None = setting(None, "cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: the rank's GPU)")
    dtype: str | torch.dtype = setting("float32", "compute dtype (autocast for features; weights for speed)",
                                       choices=list(DTYPES))


@dataclass
class FeatureSettings(ModelSettings):
    """What every feature-extracting protocol (knn, linear, zeroshot, retrieval) shares.
    ``cache_dir=False`` (the older keyword's way) is ``cache=False``."""

    batch_size: int = setting(64, "images per forward (per process)")
    workers: int = setting(0, "DataLoader worker processes")
    cache_dir: str | os.PathLike | None = setting(
        None, "feature cache directory (default: $DGMR_CACHE/features or ~/.cache/dgmr/features)")
    cache: bool = setting(True, "read cached features and store new ones (under --cache-dir)",
                          off="do not read or write cached features: compute every feature anew")
    label: str | None = setting(None, "model name in results and reports (default: MODEL)")
    crop_pct: float | None = setting(
        None, "resize to size/FRACTION and center-crop (e.g. 0.875: 256 -> 224) in the model's mean/std, instead "
              "of the model's own eval transform (the default)", metavar="FRACTION")
    dataset: str | None = setting(
        None, "dataset name for the result file (clip_benchmark's 'dataset' field) and for per-dataset "
              "class-name/template JSON files (default: the data folder's name)", metavar="NAME")
    progress: bool = setting(False, "show progress bars (the CLI's: unless --json)", cli=False)

    def __post_init__(self) -> None:
        if self.cache_dir is False:
            self.cache, self.cache_dir = False, None
        elif self.cache_dir is True:
            self.cache_dir = None
        if self.batch_size < 1:
            raise DgmrError("--batch-size must be >= 1")
        if self.image_size is not None and self.image_size < 1:
            raise DgmrError("--image-size must be >= 1")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise DgmrError("--crop-pct must be in (0, 1]")
        if self.workers < 0:
            raise DgmrError("--workers must be >= 0")

    @property
    def cache_root(self) -> str | os.PathLike | None | bool:
        """The feature cache: False (none), None (the default directory) or a directory."""
        return self.cache_dir if self.cache else False


@dataclass
class KnnSettings:
    """``dgmr eval knn``: weighted kNN."""

    k: list[int] = setting(list(DEFAULT_KS), "comma-separated k values")
    temperature: float = setting(0.07, "vote temperature T")


@dataclass
class LinearSettings:
    """``dgmr eval linear``: the linear probe."""

    weight_decays: list[float] = setting(list(DEFAULT_WEIGHT_DECAYS), "comma-separated L2 penalties to try")
    held_out: float = setting(0.2, "fraction of --train held out to pick the penalty")
    max_iter: int = setting(200, "L-BFGS iterations per fit")
    seed: int = setting(0, "seed of the held-out split (and of the clip_benchmark probe)")
    protocol: str = setting("lbfgs", "probe recipe", choices=list(LINEAR_PROTOCOLS))
    lr: float = setting(0.1, "clip_benchmark protocol: AdamW learning rate")
    epochs: int = setting(10, "clip_benchmark protocol: epochs")
    probe_batch_size: int = setting(64, "clip_benchmark protocol: probe training batch size")

    def __post_init__(self) -> None:
        if self.protocol not in LINEAR_PROTOCOLS:
            raise DgmrError(f"unknown linear-probe protocol {self.protocol!r}: use one of "
                            f"{', '.join(LINEAR_PROTOCOLS)}")
        if not self.lr > 0 or self.epochs < 1 or self.probe_batch_size < 1:
            raise DgmrError("--lr must be > 0, --epochs and --probe-batch-size >= 1")
        if not 0 <= self.held_out < 1 or (self.held_out == 0 and self.protocol == "lbfgs"):
            raise DgmrError("--held-out must be in (0, 1) (0 is allowed with --protocol clip_benchmark: "
                            "no weight-decay search)")


@dataclass
class TextTowerSettings:
    """Where zero-shot and retrieval take their text embeddings from."""

    text_model: str | os.PathLike | nn.Module | None = setting(
        None, "take the text tower from this model (e.g. the original CLIP for a vision-only student)",
        metavar="MODEL")
    text_batch_size: int = setting(256, "texts per forward of the text tower", cli=False)


@dataclass
class ZeroshotSettings(TextTowerSettings):
    """``dgmr eval zeroshot``: class names and prompt templates (Python: also lists)."""

    classnames: str | os.PathLike | Sequence[str] | None = setting(
        None, "class names in sorted folder order: one per line (.txt), a JSON list or clip_benchmark's per-dataset "
              "JSON (en_classnames.json; see --dataset); default: the bundled ImageNet-1K names (only for 1000 "
              "class folders)")
    templates: str | os.PathLike | Sequence[str] | dict[str, Sequence[str]] | None = setting(
        None, "prompt templates with '{c}' or '{}' for the class name: one per line (.txt), a JSON list, "
              "clip_benchmark's per-dataset JSON (see --dataset) or per-class prompts {class: [prompts]} "
              "(default: the 80 OpenAI ImageNet ones)")


@dataclass
class RetrievalSettings(TextTowerSettings):
    """``dgmr eval retrieval``: recall@K."""

    k: list[int] = setting([1, 5, 10], "comma-separated K values")
    ties: str = setting("expected", "scores tied with a right item: expected (recall expected under random "
                                    "tie-breaking), optimistic (ties count as hits), pessimistic (ties count as "
                                    "misses)", choices=list(TIE_MODES))

    def __post_init__(self) -> None:
        check_options(self.k, self.ties)  # before the model is opened


@dataclass
class SpeedSettings(ModelSettings):
    """``dgmr eval speed``: the timing loop (``label``: a list, or comma-separated text)."""

    batch_size: int = setting(32, "images per forward")
    warmup: int = setting(3, "untimed forwards per model first")
    repeats: int = setting(10, "timed forwards per model")
    label: list[str] | None = setting(None, "comma-separated names for the models (default: the MODELs)",
                                      type=comma_names)

    def __post_init__(self) -> None:
        if isinstance(self.label, str):
            self.label = comma_names(self.label)
        if self.batch_size < 1 or self.repeats < 1:
            raise DgmrError("--batch-size and --repeats must be >= 1")
        if self.warmup < 0:
            raise DgmrError("--warmup must be >= 0")


def resolve(function: str, keywords: dict[str, Any], *given: tuple[type, Any]) -> list[Any]:
    """The settings objects of ``function`` from ``given`` ((dataclass, object or None) pairs)
    and its loose ``keywords`` (any field of those dataclasses, or an :data:`ALIASES` name),
    which override the objects' values. An unknown keyword is Python's own TypeError."""
    known = set().union(*(names(cls) for cls, _ in given))
    values: dict[str, Any] = {}
    for key, value in keywords.items():
        name = ALIASES[key] if ALIASES.get(key) in known else key
        if name in values:
            raise TypeError(f"{function}() got multiple values for keyword argument {name!r}")
        values[name] = value
    unknown_keyword(function, values, *(cls for cls, _ in given))
    out = []
    for cls, obj in given:
        mine = {k: v for k, v in values.items() if k in names(cls)}
        if obj is None:
            obj = cls(**mine)
        elif not isinstance(obj, cls):
            raise TypeError(f"{function}() expects a {cls.__name__}, got {type(obj).__name__}")
        elif mine:
            obj = dataclasses.replace(obj, **mine)
        out.append(obj)
    return out
