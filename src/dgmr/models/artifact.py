"""The dgmr artifact: ``model.safetensors`` + ``config.json`` (+ the source library's own format).

``save`` writes everything into a temporary sibling directory and renames it into place,
so a crash never leaves a half-written output. ``load`` rebuilds the architecture from the
recorded source (no network), applies the recorded widths and loads the weights; nothing
is ever unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from ..core.dtypes import dtype_name, parse_dtype
from ..core.errors import DgmrError, first_line
from ..core.version import __version__
from ..io import schema
from ..io.checkpoints import SHARD_INDEX, WEIGHTS
from ..io.output import atomic_dir, write_json
from .families import Family, apply_heads, apply_widths, family_of, get_family
from .record import PruneRecord
from .sources import Source, build_model, is_dgmr_dir

INDICES = "kept_indices.safetensors"
CONFIG = "config.json"
NATIVE_OFF = {"skipped": "native export turned off"}


def vision_params(model: nn.Module, family: Family | None = None) -> int:
    return (family or family_of(model)).vision_params(model)


def build_config(*, family: Family, model_class: str, dtype: str, widths: dict[str, int], vision_params: int,
                 source: Source | None, record: "PruneRecord | None", native_export: dict[str, Any],
                 extra: dict[str, Any] | None = None, heads: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a dgmr directory: the one layout :func:`save` and the streaming
    prune both write and :func:`load` reads. ``heads``: each attention layer's head count,
    written for models with attention dgmr knows."""
    return {
        "format": "dgmr",
        "dgmr_version": __version__,
        "spec": source.spec if source else None,
        "source": source.to_dict() if source else None,
        "family": family.name,
        "class": model_class,
        "dtype": dtype,
        "widths": dict(widths),
        **({"heads": heads} if heads else {}),
        "vision_params": vision_params,
        "prune": record.to_json() if record is not None else None,
        "native_export": native_export,
        **(extra or {}),
    }


def write_kept_indices(path: Path, record: "PruneRecord") -> None:
    """Kept hidden neurons per MLP and, where heads were cut, kept heads per attention layer
    (each under its module's name)."""
    kept = {layer["name"]: layer["kept"].contiguous() for layer in [*record.layers, *record.heads]}
    save_file(kept, str(path / INDICES))


def head_counts(model: nn.Module, family: Family) -> dict[str, int]:
    """What ``config.json``'s ``heads`` records: every attention layer's head count ({} when
    the model has no attention dgmr knows), whether or not this save's record cut heads (a
    distilled student is saved without one)."""
    return {s.name: s.heads for s in family.attention(model)}


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
    for name, t in model.state_dict().items():  # before the output directory is touched
        schema.check_finite(name, t, str(out))
    with atomic_dir(out, overwrite) as tmp:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "dgmr_version": __version__})
        if record is not None:
            write_kept_indices(tmp, record)
        notes = family.export_native(model, tmp, source) if native else NATIVE_OFF
        config = build_config(family=family, model_class=type(model).__name__, dtype=dtype_name(dtype),
                              widths={s.name: s.hidden for s in sites}, vision_params=family.vision_params(model),
                              source=source, record=record, native_export=notes, extra=extra,
                              heads=head_counts(model, family))
        write_json(tmp / CONFIG, config)
    return config


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise DgmrError(f"{path} is not a directory")
    if not is_dgmr_dir(path):
        raise DgmrError(f"{path} is not a dgmr model directory (no config.json with format 'dgmr')")
    return schema.model_config(schema.read_json_file(path / CONFIG, "model config"), str(path / CONFIG))


def load(path: str | os.PathLike, *, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the exact pruned model saved in ``path`` (eval mode).

    The architecture comes from the recorded source, or from ``model`` when the source
    library is not one dgmr knows (generic family). It is built with its parameters on the
    ``meta`` device (buffers real: rotary tables, position ids), cut to the recorded widths
    and given the checkpoint's tensors as they are read: no random init, and the model's
    weights are in memory once, whatever its size. Nothing is unpickled."""
    path = Path(path)
    cfg = read_config(path)
    src = Source.from_dict(cfg["source"]) if cfg.get("source") else None
    assign = model is None
    if model is None:
        if src is None:
            raise DgmrError(f"{path} records no model source: pass the unpruned architecture as model=")
        model = _build_empty(src)
        if model is None:  # tied parameters: assigning tensors would untie them
            model, assign = build_model(src, pretrained=False), False
    family = get_family(cfg["family"])
    apply_heads(model, {k: int(v) for k, v in (cfg.get("heads") or {}).items()}, family)
    apply_widths(model, {k: int(v) for k, v in cfg["widths"].items()}, family)
    if src is not None:
        family.update_config(model, None)
    model.to(dtype=parse_dtype(cfg.get("dtype", "float32"), what=f"{path / CONFIG}: dtype", any_float=True))
    weights = weights_file(path, cfg)
    scope = cfg.get("weights_scope")  # a checkpoint of the vision tower alone: return that tower
    if scope:
        model = dict(model.named_modules())[scope]
    try:
        _load_weights(model, weights, assign, prefix=f"{scope}." if scope else "")
    except (SafetensorError, OSError) as e:
        raise DgmrError(f"corrupt or unreadable checkpoint {weights}: {e}") from e
    except RuntimeError as e:
        first = first_line(e)
        raise DgmrError(f"checkpoint {weights} does not match the recorded architecture: {first}") from e
    return model.to(device).eval()


def _build_empty(src: Source) -> nn.Module | None:
    """``src``'s architecture with parameters on ``meta`` and real buffers; ``None`` if it ties parameters."""
    model = build_model(src, pretrained=False, empty=True)
    named = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return model if len({id(p) for p in named}) == len(named) else None


def weights_file(path: Path, cfg: dict[str, Any]) -> Path:
    """The checkpoint of a dgmr directory: ``model.safetensors`` or a shard index, at the
    top or where ``config.json``'s ``weights`` says (streamed Hugging Face output keeps its
    shards in ``hf/``)."""
    names = [cfg["weights"]] if cfg.get("weights") else [WEIGHTS, SHARD_INDEX]
    for name in names:
        if (path / name).is_file():
            return path / name
    raise DgmrError(f"missing checkpoint {path / names[0]}")


def _load_weights(model: nn.Module, weights: Path, assign: bool, prefix: str = "") -> None:
    """Load a single file or HF-style shards (one shard in memory at a time), strictly;
    the checkpoint's names carry ``prefix`` (the tower's name in the whole model)."""
    if weights.name.endswith(".index.json"):
        try:
            weight_map = json.loads(weights.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise DgmrError(f"{weights} is not a safetensors index: {e}") from None
        shards = [weights.parent / f for f in sorted(set(weight_map.values()))]
    else:
        shards = [weights]
    state = model.state_dict()
    expected = set(state)
    # tied tensors are saved once (safetensors.save_model): any one name loads the group
    group: dict[str, tuple] = {}
    for n, t in state.items():
        group[n] = (id(t),) if t.is_meta else (t.device.type, t.untyped_storage().data_ptr())
    seen: set[str] = set()
    for shard in shards:
        sd = load_file(str(shard), device="cpu")
        if prefix:
            outside = [k for k in sd if not k.startswith(prefix)]
            if outside:
                raise RuntimeError(f"unexpected key {outside[0]!r} in {shard.name} (expected {prefix}*)")
            sd = {k[len(prefix):]: v for k, v in sd.items()}
        unexpected = sorted(set(sd) - expected)
        if unexpected:
            raise RuntimeError(f"unexpected key {unexpected[0]!r} in {shard.name}")
        if assign:  # assignment keeps the file's dtype: give each tensor the model's, as a copy would
            sd = {k: v.to(state[k].dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=False, assign=assign)
        seen |= set(sd)
        del sd
    loaded = {group[n] for n in seen}
    missing = sorted(n for n in expected - seen if group[n] not in loaded)
    if missing:
        raise RuntimeError(f"{len(missing)} missing keys, e.g. {missing[0]!r}")
    _init_meta_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{len(left)} tensors were not in the checkpoint, e.g. {left[0]!r}")


def _init_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers a library computes on its weights' device (timm Swin's shifted-window
    ``attn_mask``) were built on meta with the parameters: compute them again, now that the
    weights are real (timm modules say how with ``init_non_persistent_buffers``)."""
    for m in model.modules():
        if hasattr(m, "init_non_persistent_buffers") and any(b.is_meta for b in m.buffers(recurse=False)):
            m.init_non_persistent_buffers()


def load_kept_indices(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / INDICES))


def write_streamed_config(tmp: Path, *, family: Family, meta: nn.Module, src: Source, layout: str, scope: str | None,
                          record: PruneRecord, native: bool, dtypes: set[torch.dtype], params_before: int,
                          files: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """The native export and config.json of weights written tensor by tensor (a streaming prune,
    ``dgmr import``), from the meta model cut to the output's widths; ``dtypes`` are the
    output's floating dtypes."""
    note = NATIVE_OFF
    if native:  # written from the meta model's config: no weights needed
        try:
            note = family.export_streamed(meta, tmp, src, layout, scope)
        except (DgmrError, RuntimeError, ValueError, NotImplementedError) as e:
            note = {"skipped": f"native export failed on the meta model: {first_line(e)}"}
    names = sorted(dtype_name(d) for d in dtypes)
    params_after = family.vision_params(meta)
    extra = {"params_before": params_before, "params_after": params_after, "random_init": False,
             "weights": files[-1], "files": files, **extra}
    if scope is not None:
        extra["weights_scope"] = scope
    config = build_config(family=family, model_class=type(meta).__name__,
                          dtype=names[0] if len(names) == 1 else "float32",
                          widths={s.name: s.hidden for s in family.mlps(meta)}, vision_params=params_after,
                          source=src, record=record, native_export=note, extra=extra,
                          heads=head_counts(meta, family))
    write_json(tmp / CONFIG, config)
    return config
