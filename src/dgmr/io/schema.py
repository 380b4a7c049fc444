"""Checks of the files dgmr reads back, at the boundary: one clear error naming the file and
the field, instead of a KeyError or TypeError deep inside.

* :func:`model_config`: a dgmr directory's ``config.json``;
* :func:`run_config`: a distill run's ``run_config.json``;
* :func:`checkpoint`: the distill checkpoint dict (after ``torch.load(weights_only=True)``);
* :func:`metrics_row`: one ``metrics.jsonl`` line;
* :func:`kept_indices`: a dgmr directory's ``kept_indices.safetensors``, against its widths.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..core.dtypes import WEIGHT_DTYPES, parse_dtype
from ..core.errors import DgmrError
from .files import read_json_file, read_small_file, read_text_file  # noqa: F401 - re-exported: schema.read_json_file

LIBRARIES = ("timm", "open_clip", "hf")  # the model libraries a dgmr source names


def _fail(where: str, field: str, problem: str) -> DgmrError:
    return DgmrError(f"{where}: {field} {problem}")


def _object(value: Any, where: str, field: str = "the file") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, field, f"must be a JSON object, not {type(value).__name__}")
    return value


def _int(value: Any, where: str, field: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, field, f"must be an integer, not {value!r}"[:200])
    if value < lo or (hi is not None and value > hi):
        raise _fail(where, field, f"must be in [{lo}, {hi if hi is not None else 'inf'}], not {value}")
    return value


def _str(value: Any, where: str, field: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(where, field, f"must be a non-empty string, not {value!r}"[:200])
    return value


def model_config(cfg: Any, where: str) -> dict[str, Any]:
    """A dgmr ``config.json``: family, widths and heads (name -> positive int), dtype (one of
    :data:`~dgmr.core.dtypes.WEIGHT_DTYPES`), source (null, or an object with a known library and a name)."""
    cfg = _object(cfg, where)
    if cfg.get("format") != "dgmr":
        raise _fail(where, "format", f"must be 'dgmr', not {cfg.get('format')!r}")
    _str(cfg.get("family"), where, "family")
    widths = _object(cfg.get("widths"), where, "widths")
    for name, w in widths.items():
        _int(w, where, f"widths[{name!r}]", lo=1, hi=1 << 24)  # a bound before anything is allocated from it
    for name, h in _object(cfg.get("heads", {}), where, "heads").items():  # attention heads per layer, if recorded
        _int(h, where, f"heads[{name!r}]", lo=1, hi=1 << 16)
    for key in ("weights", "weights_scope"):
        value = _str(cfg.get(key), where, key, optional=True)
        # a relative path inside the directory: a config must not point the loader at another model's weights
        if key == "weights" and value and (os.path.isabs(value) or ".." in Path(value).parts):
            raise _fail(where, key, f"must name a file inside the model directory, not {value!r}")
    if not isinstance(cfg.get("dtype", "float32"), str):
        raise _fail(where, "dtype", f"must be a string, not {cfg.get('dtype')!r}"[:200])
    try:
        parse_dtype(cfg.get("dtype", "float32"), what="dtype", weights=True)
    except DgmrError:
        raise _fail(where, "dtype", f"{cfg.get('dtype')!r} is not a float dtype dgmr supports "
                                    f"({', '.join(WEIGHT_DTYPES)})") from None
    src = cfg.get("source")
    if src is not None:
        _object(src, where, "source")
        if src.get("library") not in LIBRARIES:
            raise _fail(where, "source.library", f"must be one of {', '.join(LIBRARIES)}, not {src.get('library')!r}")
        _str(src.get("name"), where, "source.name")
        for key in ("kwargs", "model_cfg"):
            if src.get(key) is not None:
                _object(src[key], where, f"source.{key}")
    return cfg


def run_config(cfg: Any, where: str) -> dict[str, Any]:
    """A distill ``run_config.json``: settings (an object), the inputs (paths or null), total_steps."""
    cfg = _object(cfg, where)
    _object(cfg.get("settings"), where, "settings")
    for key in ("teacher", "student", "data"):
        _str(cfg.get(key), where, key, optional=True)
    if "total_steps" in cfg:
        _int(cfg["total_steps"], where, "total_steps", lo=1)
    if cfg.get("workers") is not None:
        _int(cfg["workers"], where, "workers")
    return cfg


def checkpoint(ckpt: Any, where: str, total_steps: int | None = None) -> dict[str, Any]:
    """A distill checkpoint: counters in range (``step`` within the run), the state dicts present."""
    import torch

    ckpt = _object(ckpt, where, "the checkpoint")
    for key in ("step", "epoch", "images_seen"):
        if key not in ckpt:
            raise _fail(where, key, "is missing")
        _int(ckpt[key], where, key, hi=total_steps if key == "step" else None)
    _int(ckpt.get("unreadable_reads", 0), where, "unreadable_reads")
    _int(ckpt.get("world_size", 1), where, "world_size", lo=1)
    unreadable = ckpt.get("unreadable", [])
    if not isinstance(unreadable, list) or not all(isinstance(u, str) for u in unreadable):
        raise _fail(where, "unreadable", "must be a list of strings")
    for key in ("student", "optimizer"):
        _object(ckpt.get(key), where, key)
    if ckpt.get("ema") is not None:
        _object(ckpt["ema"], where, "ema")
    rng = ckpt.get("rng")
    if not isinstance(rng, list) or not rng or not all(isinstance(t, torch.Tensor) for t in rng):
        raise _fail(where, "rng", "must be a non-empty list of RNG state tensors")
    return ckpt


def metrics_row(raw: bytes | str, where: str) -> dict[str, Any]:
    """One metrics.jsonl line: a JSON object with an integer step >= 0 (0: the val_loss before
    training) and a number (or null) loss."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        row = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise DgmrError(f"{where}: not a JSON line ({type(e).__name__})") from None
    row = _object(row, where, "the line")
    _int(row.get("step"), where, "step", lo=0)
    loss = row.get("loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss)):
        raise _fail(where, "loss", f"must be a finite number, not {loss!r}")
    return row


def kept_indices(indices: dict[str, Any], cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``kept_indices.safetensors`` against its directory's checked ``config.json``: one
    entry per MLP the config names (kept neurons) or attention layer (kept heads), each a 1-D
    integer tensor of as many distinct indices as the layer's width or head count, each below
    what it was cut from (the ``prune`` record's ``hidden_before``/``heads_before``)."""
    import torch

    record = cfg.get("prune") if isinstance(cfg.get("prune"), dict) else {}
    sizes = {**{n: (w, "width") for n, w in cfg["widths"].items()},
             **{n: (h, "head count") for n, h in cfg.get("heads", {}).items()}}
    before = {layer.get("name"): layer.get(key) for rows, key in ((record.get("layers"), "hidden_before"),
                                                                (record.get("attention"), "heads_before"))
              for layer in (rows if isinstance(rows, list) else []) if isinstance(layer, dict)}
    for name, t in indices.items():
        if name not in sizes:
            raise _fail(where, repr(name), "names no MLP or attention layer of the model (config.json widths, heads)")
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise _fail(where, repr(name), f"must be a 1-D integer tensor, not {getattr(t, 'dtype', type(t))} "
                                           f"of shape {tuple(getattr(t, 'shape', ()))}")
        size, what = sizes[name]
        if len(t) != size:
            raise _fail(where, repr(name), f"holds {len(t)} indices for a {what} of {size}")
        top = before.get(name)
        if len(t) and (int(t.min()) < 0 or (isinstance(top, int) and int(t.max()) >= top)):
            raise _fail(where, repr(name), f"holds indices in [{int(t.min())}, {int(t.max())}], outside "
                                           f"[0, {top if isinstance(top, int) else what})")
        if len(torch.unique(t)) != len(t):
            raise _fail(where, repr(name), "holds an index twice")
    return indices


def check_finite(name: str, t: Any, where: str = "") -> None:
    """Refuse to write a float tensor holding NaN or infinity (a model with them computes
    NaN). Attention masks (a name with "mask") may hold -inf/inf by design: NaN only there."""
    import torch

    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta or not t.numel():
        return
    bad = torch.isnan(t) if "mask" in name.lower() else ~torch.isfinite(t)
    if bad.any():
        kind = "NaN" if torch.isnan(t).any() else "infinite"
        raise DgmrError(f"tensor {name} holds {int(bad.sum())} {kind} value(s) (of {t.numel()}): refusing to write "
                        f"{where or 'it'}; nothing was written")
