"""What a prune cut, as dgmr directories record it: per-layer widths and kept indices, and
how they were chosen (``dgmr.json``'s ``prune`` section and ``dgmr/kept_indices.safetensors``);
attention layers whose heads were cut too, with their head counts and kept heads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .sites.attention import AttentionSite
from .sites.mlp import MlpSite


@dataclass
class PruneRecord:
    """What was cut: per-layer widths and kept indices, plus how they were chosen."""

    criterion: str
    seed: int
    request: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    config_updates: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None  # what calibrated the cut (docs/calibration.md), if anything
    heads: list[dict[str, Any]] = field(default_factory=list)  # attention layers whose heads were cut

    @property
    def head_counts(self) -> dict[str, int]:
        return {layer["name"]: layer["heads_after"] for layer in self.heads}

    @property
    def kept_heads(self) -> dict[str, torch.Tensor]:
        return {layer["name"]: layer["kept"] for layer in self.heads}

    @property
    def widths(self) -> dict[str, int]:
        return {layer["name"]: layer["hidden_after"] for layer in self.layers}

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        return {layer["name"]: layer["kept"] for layer in self.layers}

    @classmethod
    def start(cls, criterion: str, seed: int, *, mlp_ratio: float | None = None, hidden: int | None = None,
              keep_fraction: float | None = None, heads: Any = None, head_fraction: float | None = None,
              params_fraction: float | None = None) -> "PruneRecord":
        """An empty record of a uniform width request (the request keeps only what was given)."""
        request = {k: v for k, v in (("mlp_ratio", mlp_ratio), ("hidden", hidden), ("keep_fraction", keep_fraction),
                                     ("heads", heads if isinstance(heads, (int, type(None))) else "per layer"),
                                     ("head_fraction", head_fraction), ("params_fraction", params_fraction))
                   if v is not None}
        return cls(criterion, seed, request)

    def add(self, site: MlpSite, hidden_before: int, keep: torch.Tensor | None, **extra: Any) -> None:
        """Record that ``site`` (already cut) kept ``keep`` of its ``hidden_before`` neurons
        (``None``: which ones is unknown, as for an imported checkpoint)."""
        self.layers.append({"name": site.name, "kind": site.kind, "in_features": site.in_features,
                            "hidden_before": hidden_before, "hidden_after": site.hidden, **extra, "kept": keep})

    def add_heads(self, site: AttentionSite, heads_before: int, keep: torch.Tensor | None, **extra: Any) -> None:
        """Record that attention layer ``site`` (already cut) kept heads ``keep`` of its
        ``heads_before`` (``None``: which ones is unknown, as for an imported checkpoint)."""
        self.heads.append({"name": site.name, "kind": site.kind, "head_dim": site.head_dim,
                           "heads_before": heads_before, "heads_after": site.heads, **extra, "kept": keep})

    def to_json(self) -> dict[str, Any]:
        heads = [{k: v for k, v in layer.items() if k != "kept"} for layer in self.heads]
        return {"criterion": self.criterion, "seed": self.seed, **self.request,
                **({"calibration": self.calibration} if self.calibration is not None else {}),
                "layers": [{k: v for k, v in layer.items() if k != "kept"} for layer in self.layers],
                **({"attention": heads} if heads else {})}
