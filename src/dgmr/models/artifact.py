"""The dgmr directory: a model repository of the source library, with dgmr's record beside it.

::

    model.safetensors          the weights, once (or HF-style shards + model.safetensors.index.json)
    dgmr.json                  dgmr's record: source, family, widths, what was cut and how, sizes
    dgmr/kept_indices.safetensors   the kept neurons per MLP (when known); in a sub-folder because
                               timm's local-dir loader (up to at least 1.0.25) fails on a folder
                               with two *.safetensors files at its top
    README.md                  the model card (Hugging Face conventions, :mod:`.card`)
    + the library's own files, where its config can describe the model:
      timm: config.json (hub format)   open_clip: open_clip_config.json
      transformers: config.json + preprocessor_config.json

``save`` writes everything into a temporary sibling directory and renames it into place,
so a crash never leaves a half-written output. ``load`` rebuilds the architecture from the
recorded source (no network), applies the recorded widths and loads the weights; nothing
is ever unpickled. Directories dgmr wrote before (record in ``config.json``, transformers
files in ``hf/``) still load.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from ..core.dtypes import dtype_name, parse_dtype, weight_dtype_name
from ..core.errors import DgmrError, first_line
from ..core.version import __version__
from ..io import schema
from ..io.checkpoints import SHARD_INDEX, WEIGHTS
from ..io.output import atomic_dir, seal_file, sync_dir, write_json
from .card import CARD, render_card
from .cost import count_flops
from .families import Family, apply_heads, apply_widths, family_of, get_family
from .record import PruneRecord
from .sources import LEGACY_RECORD, RECORD, Source, build_model, dgmr_record_file, is_record_file

INDICES = "dgmr/kept_indices.safetensors"
LEGACY_INDICES = "kept_indices.safetensors"  # at the top, in directories older dgmr versions wrote
CONFIG = RECORD  # dgmr's record (written last: a directory with one is complete)
LAYOUT = 2  # 1: the record in config.json, transformers files in hf/ (dgmr before the library-repo layout)
NATIVE_OFF = {"skipped": "native export turned off"}
PREPROCESS_ATTR = "dgmr_preprocess"  # what dgmr.load sets on a model: its directory's saved preprocessing


def vision_params(model: nn.Module, family: Family | None = None) -> int:
    return (family or family_of(model)).vision_params(model)


def build_config(*, family: Family, model_class: str, dtype: str, widths: dict[str, int], vision_params: int,
                 source: Source | None, record: "PruneRecord | None", native_export: dict[str, Any],
                 extra: dict[str, Any] | None = None, heads: dict[str, int] | None = None) -> dict[str, Any]:
    """dgmr's record of a dgmr directory (``dgmr.json``): the one layout :func:`save` and the streaming
    prune both write and :func:`load` reads. ``heads``: each attention layer's head count,
    written for models with attention dgmr knows."""
    return {
        "format": "dgmr",
        "layout": LAYOUT,
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
    (path / INDICES).parent.mkdir(exist_ok=True)
    save_file(kept, str(path / INDICES))


def head_counts(model: nn.Module, family: Family) -> dict[str, int]:
    """What ``dgmr.json``'s ``heads`` records: every attention layer's head count ({} when
    the model has no attention dgmr knows), whether or not this save's record cut heads (a
    distilled student is saved without one)."""
    return {s.name: s.heads for s in family.attention(model)}


# what only the old layout wrote at the top of a directory (besides its record in config.json)
LEGACY_ONLY = (LEGACY_INDICES, "timm_config.json", "hf")


def legacy_leftovers(path: str | os.PathLike) -> list[Path]:
    """The old layout's entries in ``path`` that the current one never writes there, and an
    old record in config.json: stale once a current-layout model is written over them (a
    distillation run an older dgmr exported, resumed and exported again), and misleading to
    a library that opens the folder (timm's ``local-dir:`` reads config.json)."""
    p = Path(path)
    found = [p / name for name in LEGACY_ONLY if (p / name).exists() or (p / name).is_symlink()]
    if is_record_file(p / LEGACY_RECORD):  # dgmr's record belongs in dgmr.json now; config.json is the library's
        found.append(p / LEGACY_RECORD)
    return found


def kept_indices_file(path: str | os.PathLike) -> Path | None:
    """The kept-indices file of a dgmr directory (either layout), None when it has none (an import)."""
    for name in (INDICES, LEGACY_INDICES):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def copy_kept_indices(src_dir: str | os.PathLike, dst_dir: Path) -> None:
    """Carry a directory's kept indices into another one being written (a distilled student's)."""
    file = kept_indices_file(src_dir)
    if file is not None:
        (dst_dir / INDICES).parent.mkdir(exist_ok=True)
        shutil.copyfile(file, dst_dir / INDICES)
        seal_file(dst_dir / INDICES)  # the mode and flush of every file dgmr writes
        sync_dir((dst_dir / INDICES).parent)  # its sub-folder is moved into place whole: its entry flushed now


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
    weight_dtype_name(dtype, str(out))  # a dtype load cannot read back is refused before anything is written
    for name, t in model.state_dict().items():  # before the output directory is touched
        schema.check_finite(name, t, str(out))
    widths = {s.name: s.hidden for s in sites}
    extra = dict(extra or {})
    described = describe(model, family, source, widths, random_init=bool(extra.get("random_init")))
    with atomic_dir(out, overwrite) as tmp:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "dgmr_version": __version__})
        if record is not None:
            write_kept_indices(tmp, record)
        notes = family.export_native(model, tmp, source) if native else NATIVE_OFF
        config = build_config(family=family, model_class=type(model).__name__, dtype=dtype_name(dtype),
                              widths=widths, vision_params=family.vision_params(model), source=source, record=record,
                              native_export=notes, extra={**described, **extra}, heads=head_counts(model, family))
        write_record(tmp, config)
    return config


def write_record(directory: Path, config: dict[str, Any]) -> None:
    """The model card, then dgmr.json (last: a directory with a record is complete)."""
    (directory / CARD).write_text(render_card(config))
    write_json(directory / RECORD, config)


def describe(model: nn.Module, family: Family, src: Source | None, widths: dict[str, int], *,
             random_init: bool = False, params_before: int | None = None) -> dict[str, Any]:
    """What the record keeps for the card and for ``dgmr eval``: the eval preprocessing, the
    card's metadata, params and FLOPs before and after (shapes only, on the meta device)."""
    out: dict[str, Any] = {"card": family.card_info(model, src, random_init=random_init)}
    try:  # a model dgmr.load opened keeps the preprocessing its directory saved
        out["preprocess"] = getattr(model, PREPROCESS_ATTR, None) or family.eval_preprocess(model, src).settings
    except Exception as e:  # a processor the library cannot build offline: dgmr eval warns and falls back
        out["preprocess"] = None
        out["preprocess_missing"] = first_line(e)
    out.update(_sizes(model, family, src, widths, params_before))
    return out


def _sizes(model: nn.Module, family: Family, src: Source | None, widths: dict[str, int],
           params_before: int | None) -> dict[str, Any]:
    """params and FLOPs (one image at the model's size) of the source and of the pruned widths
    and head counts."""
    size = family.image_size(model)
    out: dict[str, Any] = {"image_size": size}
    try:
        if src is None:
            out.update(params_after=family.vision_params(model), flops_after=count_flops(model, family, size))
            return out
        meta = build_model(src, meta=True)
        out.update(params_before=params_before or family.vision_params(meta),
                   flops_before=count_flops(meta, family, size))
        apply_heads(meta, head_counts(model, family), family)
        apply_widths(meta, widths, family)
        out.update(params_after=family.vision_params(meta), flops_after=count_flops(meta, family, size))
    except Exception:  # noqa: BLE001 - any model that cannot run on meta (torch asserts too): FLOPs unknown on the card
        pass
    return out


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """dgmr's record of the directory ``path``: dgmr.json, or config.json in the old layout."""
    path = Path(path)
    if not path.is_dir():
        raise DgmrError(f"{path} is not a directory")
    file = dgmr_record_file(path)
    if file is None:
        raise DgmrError(f"{path} is not a dgmr model directory (no {RECORD}, nor a {LEGACY_RECORD} with format 'dgmr')")
    return schema.model_config(schema.read_json_file(file, "model config"), str(file))


def record_file(path: str | os.PathLike) -> Path:
    """The file holding dgmr's record in the dgmr directory ``path``."""
    file = dgmr_record_file(path)
    if file is None:
        raise DgmrError(f"{path} is not a dgmr model directory")
    return file


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
    model.to(dtype=parse_dtype(cfg.get("dtype", "float32"), what=f"{record_file(path)}: dtype", weights=True))
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
    if isinstance(cfg.get("preprocess"), dict):  # travels on with the model into what is saved from it
        setattr(model, PREPROCESS_ATTR, cfg["preprocess"])
    return model.to(device).eval()


def saved_preprocess(path: str | os.PathLike, cfg: dict[str, Any]) -> tuple[dict[str, Any], Path] | None:
    """(settings, directory) of the eval preprocessing the dgmr directory ``path`` saved, for
    :func:`~dgmr.models.preprocess.resolve_eval_preprocess`; None, with a warning, when it saved
    none (written by an older dgmr)."""
    saved = cfg.get("preprocess")
    if isinstance(saved, dict) and saved.get("library"):
        return saved, Path(path)
    warnings.warn(f"{path} records no preprocessing (a directory an older dgmr wrote, or one whose processor could "
                  f"not be built): evaluating with the library's defaults for the architecture; re-save it to keep "
                  "the source's preprocessing with the model", stacklevel=2)
    return None


def _build_empty(src: Source) -> nn.Module | None:
    """``src``'s architecture with parameters on ``meta`` and real buffers; ``None`` if it ties parameters."""
    model = build_model(src, pretrained=False, empty=True)
    named = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return model if len({id(p) for p in named}) == len(named) else None


def weights_file(path: Path, cfg: dict[str, Any]) -> Path:
    """The checkpoint of a dgmr directory: ``model.safetensors`` or a shard index, at the
    top or where the record's ``weights`` says (the old layout kept streamed Hugging Face
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
    """A dgmr directory's kept indices (empty when it has none: an imported checkpoint), from
    either layout, checked against its widths and heads (:func:`dgmr.io.schema.kept_indices`):
    one line naming the file and the layer otherwise."""
    file = kept_indices_file(path)
    if file is None:
        return {}
    cfg = read_config(path)
    try:
        indices = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise DgmrError(f"corrupt or unreadable {file}: {first_line(e)}") from None
    return schema.kept_indices(indices, cfg, str(file))


def write_streamed_config(tmp: Path, *, family: Family, meta: nn.Module, src: Source, layout: str, scope: str | None,
                          record: PruneRecord, native: bool, dtypes: set[torch.dtype], params_before: int,
                          files: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """The native export, card and record of weights written tensor by tensor (a streaming prune,
    ``dgmr import``), from the meta model cut to the output's widths; ``dtypes`` are the
    output's floating dtypes."""
    note = NATIVE_OFF
    if native:  # written from the meta model's config: no weights needed
        try:
            note = family.export_streamed(meta, tmp, src, layout, scope)
        except (DgmrError, RuntimeError, ValueError, NotImplementedError) as e:
            note = {"skipped": f"native export failed on the meta model: {first_line(e)}"}
    names = sorted(weight_dtype_name(d, "the output") for d in dtypes)
    params_after = family.vision_params(meta)
    widths = {s.name: s.hidden for s in family.mlps(meta)}
    extra = {**describe(meta, family, src, widths, params_before=params_before), "params_before": params_before,
             "params_after": params_after, "random_init": False, "weights": files[-1], "files": files, **extra}
    if scope is not None:
        extra["weights_scope"] = scope
    config = build_config(family=family, model_class=type(meta).__name__,
                          dtype=names[0] if len(names) == 1 else "float32",
                          widths=widths, vision_params=params_after,
                          source=src, record=record, native_export=note, extra=extra,
                          heads=head_counts(meta, family))
    write_record(tmp, config)
    return config
