"""The dgmr artifact: ``model.safetensors`` + ``config.json`` (+ the source library's own format).

``save`` writes everything into a temporary sibling directory and renames it into place,
so a crash never leaves a half-written output. ``load`` rebuilds the architecture from the
recorded source (no network), applies the recorded widths and loads the weights; nothing
is ever unpickled.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from . import __version__
from .errors import DgmrError
from .families import Family, apply_widths, family_of, get_family
from .prune import PruneRecord
from .sources import Source, build_model, is_dgmr_dir

WEIGHTS = "model.safetensors"
INDICES = "kept_indices.safetensors"
CONFIG = "config.json"
SHARD_INDEX = "model.safetensors.index.json"  # sharded weights (dgmr.stream writes them)


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` holds files and ``overwrite`` is off."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DgmrError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DgmrError(f"output directory {out} is not empty (pass --overwrite to replace it)")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def vision_params(model: nn.Module, family: Family | None = None) -> int:
    family = family or family_of(model)
    return sum(p.numel() for p in family.vision_root(model)[1].parameters())


def save(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    source: Source | None = None,
    record: PruneRecord | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    native: bool = True,
) -> dict[str, Any]:
    """Save a (pruned) model as a dgmr directory; returns the config written."""
    family = family_of(model)
    sites = family.mlps(model)
    dtype = next(model.parameters()).dtype
    with atomic_dir(out, overwrite) as tmp:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "dgmr_version": __version__})
        if record is not None:
            save_file({layer["name"]: layer["kept"].contiguous() for layer in record.layers}, str(tmp / INDICES))
        notes = family.export_native(model, tmp, source) if native else {"skipped": "native export turned off"}
        config: dict[str, Any] = {
            "format": "dgmr",
            "dgmr_version": __version__,
            "spec": source.spec if source else None,
            "source": source.to_dict() if source else None,
            "family": family.name,
            "class": type(model).__name__,
            "dtype": str(dtype).removeprefix("torch."),
            "widths": {s.name: s.hidden for s in sites},
            "vision_params": vision_params(model, family),
            "prune": record.to_json() if record is not None else None,
            "native_export": notes,
            **(extra or {}),
        }
        write_json(tmp / CONFIG, config)
    return config


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise DgmrError(f"{path} is not a directory")
    if not is_dgmr_dir(path):
        raise DgmrError(f"{path} is not a dgmr model directory (no config.json with format 'dgmr')")
    return json.loads((path / CONFIG).read_text())


def load(path: str | os.PathLike, *, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the exact pruned model saved in ``path`` (eval mode).

    The architecture comes from the recorded source (random init, no download), or from
    ``model`` when the source library is not one dgmr knows (generic family)."""
    path = Path(path)
    cfg = read_config(path)
    src = Source.from_dict(cfg["source"]) if cfg.get("source") else None
    if model is None:
        if src is None:
            raise DgmrError(f"{path} records no model source: pass the unpruned architecture as model=")
        model = build_model(src, pretrained=False)
    family = get_family(cfg["family"])
    apply_widths(model, {k: int(v) for k, v in cfg["widths"].items()}, family)
    if src is not None:
        family.update_config(model, None)
    model.to(dtype=getattr(torch, cfg.get("dtype", "float32")))
    weights = path / WEIGHTS
    if not weights.is_file() and (path / SHARD_INDEX).is_file():
        weights = path / SHARD_INDEX
    if not weights.is_file():
        raise DgmrError(f"missing checkpoint {weights}")
    try:
        if weights.name == SHARD_INDEX:
            _load_sharded(model, weights)
        else:
            load_model(model, str(weights), strict=True, device="cpu")
    except (SafetensorError, OSError) as e:
        raise DgmrError(f"corrupt or unreadable checkpoint {weights}: {e}") from e
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise DgmrError(f"checkpoint {weights} does not match the recorded architecture: {first}") from e
    return model.to(device).eval()


def _load_sharded(model: nn.Module, index: Path) -> None:
    """Load HF-style shards listed by ``index`` (one shard in memory at a time), strictly."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise DgmrError(f"{index} is not a safetensors index: {e}") from None
    expected = set(model.state_dict())
    seen: set[str] = set()
    for shard in sorted(set(weight_map.values())):
        sd = load_file(str(index.parent / shard), device="cpu")
        unexpected = sorted(set(sd) - expected)
        if unexpected:
            raise RuntimeError(f"unexpected key {unexpected[0]!r} in {shard}")
        model.load_state_dict(sd, strict=False)
        seen |= set(sd)
        del sd
    missing = sorted(expected - seen)
    if missing:
        raise RuntimeError(f"{len(missing)} missing keys, e.g. {missing[0]!r}")


def load_kept_indices(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / INDICES))
