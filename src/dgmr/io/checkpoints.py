"""Reading safetensors checkpoints too big for memory (streaming prune, ``dgmr import``):
headers read up front, tensors read one at a time, and the names matched to an
architecture's. The file names are Hugging Face's (one file, or shards beside an index)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from ..core.errors import DgmrError

WEIGHTS = "model.safetensors"  # one file
SHARD_INDEX = INDEX = "model.safetensors.index.json"  # shards, named by this index

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
@dataclass
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Checkpoint:
    """A safetensors checkpoint, single-file or sharded; only headers are read up front."""

    path: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors (each file opened and closed again: nothing stays mapped)."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            try:
                with safe_open(str(f), framework="pt", device="cpu") as h:
                    for n in ns:
                        out[n] = h.get_tensor(n)
            except (SafetensorError, OSError) as e:
                raise DgmrError(f"cannot read {ns[0]!r} from {f}: {e}") from e
        return out


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read the headers of a ``.safetensors`` file, a ``model.safetensors.index.json``, or a
    directory holding either; a truncated or unreadable shard is a :class:`DgmrError`."""
    p = Path(path)
    if p.is_dir():
        if (p / INDEX).is_file():
            p = p / INDEX
        elif (p / WEIGHTS).is_file():
            p = p / WEIGHTS
        else:
            raise DgmrError(f"{path}: no {INDEX} or {WEIGHTS} in this directory")
    if not p.is_file():
        raise DgmrError(f"weights file {path} does not exist")
    ckpt = Checkpoint(p)
    if p.name.endswith(".json"):
        try:
            index = json.loads(p.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DgmrError(f"{p} is not a safetensors index (JSON with a 'weight_map'): {e}") from None
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(str(fname), []).append(name)
    else:
        files = {p.name: []}
    for fname, listed in files.items():
        f = (p.parent / fname).resolve() if p.name.endswith(".json") else p
        if not f.is_file():
            raise DgmrError(f"shard {fname} named by {p} does not exist")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                keys = list(h.keys())
                for k in keys:
                    sl = h.get_slice(k)
                    dt = sl.get_dtype()
                    if dt not in ST_DTYPES:
                        raise DgmrError(f"{f}: tensor {k!r} has dtype {dt}, which dgmr does not handle")
                    ckpt.tensors[k] = TensorInfo(f, ST_DTYPES[dt], tuple(sl.get_shape()))
        except SafetensorError as e:
            raise DgmrError(f"{f} is not a complete safetensors file (truncated or corrupt?): {e}") from e
        except OSError as e:
            raise DgmrError(f"cannot read {f}: {e}") from e
        missing = sorted(set(listed) - set(keys))
        if missing:
            raise DgmrError(f"{p} maps {missing[0]!r} to {fname}, which does not hold it ({len(missing)} such tensors)")
    if not ckpt.tensors:
        raise DgmrError(f"{p} holds no tensors")
    return ckpt


def match_names(ckpt: Checkpoint, expected: Mapping[str, tuple[int, ...]], tower: str,
                derived: frozenset[str] = frozenset(),
                hint: str = "wrong MODEL, --model-kwargs or --weights?") -> tuple[dict[str, str], str | None]:
    """Map the model's state-dict names to the checkpoint's: ``(model name -> checkpoint
    name, scope)``. The checkpoint holds the whole model (``scope`` None), or only the
    vision tower ``tower`` (e.g. ``visual``), named as in the whole model (``visual.…``) or
    as in the tower itself; a DDP ``module.`` prefix is dropped. Anything else, or a
    wrong shape, is a :class:`DgmrError` naming the first offender. Names in ``derived``
    (the model's non-persistent buffers, e.g. HF ``position_ids`` that older checkpoints
    carry) are ignored: the model rebuilds them."""
    names = list(ckpt.tensors)
    strip = "module." if names and all(n.startswith("module.") for n in names) else ""
    pre = f"{tower}." if tower else ""
    have = {n[len(strip):]: n for n in names
            if n[len(strip):] not in derived and pre + n[len(strip):] not in derived}
    scope = None
    want = dict(expected)
    if set(have) != set(want) and tower:
        in_tower = {k: v for k, v in expected.items() if k.startswith(pre)}
        whole = set(in_tower) == set(want)  # e.g. HF CLIPVisionModel: every name is vision_model.*
        if set(have) == set(in_tower) and not whole:
            scope, want = tower, in_tower
        elif {pre + k for k in have} == set(in_tower):
            scope, want, have = None if whole else tower, in_tower, {pre + k: v for k, v in have.items()}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    bad = [n for n in want if n in have and tuple(ckpt.tensors[have[n]].shape) != tuple(want[n])]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {have[unexpected[0]]!r})")
        if bad:
            n = bad[0]
            parts.append(f"{len(bad)} with the wrong shape (e.g. {have[n]!r}: checkpoint "
                         f"{list(ckpt.tensors[have[n]].shape)}, model {list(want[n])})")
        raise DgmrError(f"{ckpt.path} does not match the architecture: " + "; ".join(parts) +
                        f" ({hint})")
    return {n: have[n] for n in want}, scope


def checkpoint_paths(weights: str | os.PathLike) -> list[str]:
    """A checkpoint file or directory, and the shards a ``*.index.json`` names (they may
    live elsewhere than the index)."""
    paths = [os.fspath(weights)]
    index = Path(weights)
    if index.is_dir():
        index = index / "model.safetensors.index.json"
    if index.name.endswith(".index.json") and index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
            paths += [str(index.parent / str(f)) for f in sorted(shards)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # the reader reports a bad index; here only the paths matter
    return paths
