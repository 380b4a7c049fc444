"""What ``dgmr prune`` is asked to do: the fields are its flags and the keywords of
:func:`~dgmr.prune.to_dir.prune_to_dir` and :func:`~dgmr.prune.stream.stream_prune`, so each
default is declared here once (calibration's are in :mod:`.calibration.settings`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.dtypes import DTYPES
from ..core.settings import setting, unknown_keyword
from .criteria import CRITERIA

STREAM = "streaming prune: checkpoints too big for memory (docs/stream.md)"


@dataclass
class WidthSettings:
    """How wide to keep the MLPs (one of the three) and how many attention heads (one of two,
    or none) (``dgmr prune`` and ``dgmr stats``)."""

    mlp_ratio: float | None = setting(None, "keep round(R * embed_dim) hidden neurons per MLP (the paper's r)",
                                      exclusive="width", metavar="R")
    hidden: int | None = setting(None, "keep N hidden neurons per MLP", exclusive="width", metavar="N")
    keep_fraction: float | None = setting(None, "keep this fraction of each MLP's hidden neurons",
                                          exclusive="width", metavar="F")

    heads: int | None = setting(None, "also remove whole attention heads: keep N heads in every attention layer "
                                      "(the MLP width flags become optional)", exclusive="heads", metavar="N")
    head_fraction: float | None = setting(None, "also remove whole attention heads: keep round(F x heads) heads in "
                                                "every attention layer", exclusive="heads", metavar="F")

    def widths(self) -> dict[str, Any]:
        return {"mlp_ratio": self.mlp_ratio, "hidden": self.hidden, "keep_fraction": self.keep_fraction}

    def head_counts(self) -> dict[str, Any]:
        return {"heads": self.heads, "head_fraction": self.head_fraction}

    @property
    def width_given(self) -> bool:
        return any(v is not None for v in self.widths().values())

    @property
    def heads_given(self) -> bool:
        return any(v is not None for v in self.head_counts().values())


@dataclass
class PruneSettings(WidthSettings):
    """``dgmr prune``'s settings (an in-memory prune; see :class:`StreamSettings` for ``--weights``)."""

    params_fraction: float | None = setting(None, "keep this fraction of the vision tower's parameters, spent across "
                                                  "MLP neurons and attention heads by measured error (needs "
                                                  "--calibration and --allocate global; MLP width or head flags "
                                                  "beside it stay as given)", metavar="F")
    criterion: str = setting("diversity", "neuron selection: diversity (DGMR), l2, random, or with --calibration "
                                          "diversity-act; with --heads, the head selection of the same name "
                                          "(diversity, l2, random, diversity-act)", choices=lambda: sorted(CRITERIA))
    seed: int = setting(0, "seed of the random criterion (and of --random-init weights)")
    random_init: bool = setting(False, "build the architecture with random weights (no download)")
    dtype: str | None = setting(None, "dtype of the saved weights (unset: as loaded)", choices=sorted(DTYPES))
    overwrite: bool = setting(False, "replace a non-empty output directory")
    native: bool = setting(True, "also write the source library's own format",
                           off="skip the export in the source library's own format (dgmr.load still opens the output)")

    @classmethod
    def from_keywords(cls, settings: "PruneSettings | None", function: str, **given: Any) -> "PruneSettings":
        """``settings`` (or the defaults) with the keywords ``given`` applied; an unknown keyword is a TypeError."""
        unknown_keyword(function, given, cls)
        return dataclasses.replace(settings or cls(), **given)


@dataclass
class StreamSettings:
    """The flags of a streaming prune (``dgmr prune --weights``)."""

    weights: str | None = setting(None, "streaming prune: read the weights from this safetensors file, "
                                        "model.safetensors.index.json or directory, one MLP at a time (MODEL gives "
                                        "the architecture only; bounded memory)", metavar="FILE_OR_INDEX", group=STREAM)
    max_memory: str | None = setting(None, "with --weights: resident-memory budget, e.g. 3GB (sizes output shards "
                                           "and parallel layers)", metavar="SIZE", group=STREAM)
    shard_size: str | None = setting(None, "with --weights: write HF-style shards of at most SIZE (e.g. 2GB) instead "
                                           "of one model.safetensors (Hugging Face models are always sharded, beside "
                                           "their config.json)", metavar="SIZE", group=STREAM)
