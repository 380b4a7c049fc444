"""How a streaming prune is sized: output shard bytes and MLPs selected at once, within
``--max-memory``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import psutil
import torch

from ...core.dist import usable_cpus
from ...core.errors import DgmrError
from ...io.checkpoints import TensorInfo
from ...models.sites.attention import AttentionSite
from ...models.sites.mlp import MlpSite
from ..criteria import workspace_bytes

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """Bytes from ``3GB``, ``2.5GiB``, ``800M``, ``1e9`` or a plain number (decimal units: 1 GB = 1e9 B)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if m is None or (m.group(2) or "").lower() not in _UNITS:
        try:
            return int(float(text))
        except ValueError:
            raise DgmrError(f"cannot read the size {text!r}: use e.g. 3GB, 2.5GiB or 800MB") from None
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclass
class Plan:
    """How the work is sized: shard bytes and MLPs selected at once, within ``max_memory``."""

    max_memory: int | None
    baseline: int
    per_mlp: int
    shard_bytes: int
    workers: int

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("max_memory", "baseline", "per_mlp", "shard_bytes", "workers")}


def mlp_bytes(site: MlpSite, infos: Mapping[str, TensorInfo], names: Sequence[str], select_dtype: torch.dtype) -> int:
    """Peak bytes one MLP's selection holds: its weights (twice: read + cut), the scoring
    matrix and the criterion's workspace (:func:`dgmr.prune.criteria.workspace_bytes`)."""
    raw = sum(infos[n].nbytes for n in names)
    h = site.hidden
    d = site.up.weight.shape[1] * (2 if site.gated else 1)
    return 2 * raw + 2 * h * d * select_dtype.itemsize + workspace_bytes(h, d, select_dtype)


def attention_bytes(site: AttentionSite, infos: Mapping[str, TensorInfo], names: Sequence[str],
                    select_dtype: torch.dtype) -> int:
    """Peak bytes one attention layer's head selection holds: its weights (twice: read + cut)
    and its head blocks in ``select_dtype`` (twice: the blocks and the residuals)."""
    raw = sum(infos[n].nbytes for n in names)
    rows = sum(len(layout) * site.width * getattr(o, n).shape[-1] for o, n, layout in site.rows
               if getattr(o, n).ndim == 2)
    return 2 * raw + 2 * rows * select_dtype.itemsize


def make_plan(max_memory: int | None, per_mlp: int, largest: int, n_mlps: int,
              workers: int | None = None, shard_bytes: int | None = None, buffered: bool = True) -> Plan:
    """Shard size and workers within ``max_memory`` (``per_mlp``: the largest site's bytes, an
    MLP's or an attention layer's); ``buffered``: output shards are held in
    memory until written (the one-file layout streams each tensor out instead)."""
    baseline = psutil.Process().memory_info().rss
    auto_workers = max(1, min(4, usable_cpus() // 4))  # GEMMs already use every core; extra layers help on big boxes
    workers = max(1, min(n_mlps, workers or auto_workers))
    if max_memory is None:
        shard = shard_bytes or 2 * 2**30
        return Plan(None, baseline, per_mlp, max(shard, largest), workers)
    room = max_memory - baseline
    shard = shard_bytes or int(min(2 * 2**30, max(32 * 2**20, room // 8)))
    shard = max(shard, largest)
    # one shard being filled (twice: save_file serialises a copy) + one copied tensor + the MLPs in flight
    held = 2 * shard if buffered else 0
    need_one = held + largest + per_mlp
    if room < need_one:
        raise DgmrError(f"--max-memory {max_memory / 1e9:.2f} GB is too small: this process already holds "
                        f"{baseline / 1e9:.2f} GB and one MLP needs about {need_one / 1e9:.2f} GB more "
                        f"(weights, float64 scoring matrix{', one output shard' if buffered else ''})")
    workers = max(1, min(workers, (room - held - largest) // per_mlp))
    return Plan(max_memory, baseline, per_mlp, shard, workers)


