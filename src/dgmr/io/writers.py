"""Streaming safetensors writers (streaming prune, ``dgmr import``): HF-style shards that fill and flush, or one
``model.safetensors`` written as the tensors come (its header laid out up front)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from ..core.memory import release_freed
from ..core.version import __version__
from .checkpoints import INDEX, ST_DTYPES, WEIGHTS
from .output import write_json
from .schema import check_finite


class ShardWriter:
    """Collect tensors and write ``shard_bytes``-sized safetensors shards as they fill, in
    ``root / sub`` (file names returned relative to ``root``)."""

    def __init__(self, root: Path, shard_bytes: int, sub: str = ""):
        self.root, self.sub = root, sub
        self.out = root / sub
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, int] = {}
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        check_finite(name, t, "the output")  # inside atomic_dir's temporary directory: the output never appears
        nb = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + nb > self.shard_bytes:
            self.flush()
        self.buf[name] = t.contiguous()
        self.buf_bytes += nb
        self.total += nb

    def flush(self) -> None:
        if not self.buf:
            return
        i = len(self.files)
        fname = f"shard-{i:05d}.safetensors"
        save_file(self.buf, str(self.out / fname), metadata={"format": "pt", "dgmr_version": __version__})
        for n in self.buf:
            self.weight_map[n] = i
        self.files.append(fname)
        self.buf, self.buf_bytes = {}, 0
        release_freed()  # the shard and save_file's serialised copy

    def finish(self) -> list[str]:
        """Final names: ``model.safetensors`` for one shard, else HF-style shards + index."""
        self.flush()
        if len(self.files) == 1:
            (self.out / self.files[0]).rename(self.out / WEIGHTS)
            names = [WEIGHTS]
        else:
            n = len(self.files)
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for old, new in zip(self.files, names):
                (self.out / old).rename(self.out / new)
            write_json(self.out / INDEX, {"metadata": {"total_size": self.total, "format": "pt"},
                                          "weight_map": {k: names[i] for k, i in self.weight_map.items()}})
            names.append(INDEX)
        return [f"{self.sub}/{f}" if self.sub else f for f in names]


ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class FileWriter:
    """One ``model.safetensors`` written as the tensors come (bounded memory): the header
    is laid out up front from the known names, dtypes and shapes, in writing order."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "dgmr_version": __version__}}
        off = 0
        for name, dt, shape in entries:
            nb = math.prod(shape) * dt.itemsize
            header[name] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.entries, self.next, self.total = path, list(entries), 0, off
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def add(self, name: str, t: torch.Tensor) -> None:
        want = self.entries[self.next] if self.next < len(self.entries) else None
        if want is None or (name, t.dtype, tuple(t.shape)) != want:
            raise AssertionError(f"stream writer: got {name} {t.dtype} {tuple(t.shape)}, expected {want}")
        check_finite(name, t, "the output")
        self.f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.next += 1

    def finish(self) -> list[str]:
        self.f.close()
        if self.next != len(self.entries):
            raise AssertionError(f"stream writer: {len(self.entries) - self.next} tensors never came")
        return [self.path.name]


