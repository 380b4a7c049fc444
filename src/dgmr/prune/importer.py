"""Importing a model pruned elsewhere (``dgmr import``): a state dict with narrower MLPs,
in the source library's naming or the original training code's, becomes a dgmr directory.

1. The checkpoint is opened without reading its weights: safetensors through the streaming
   prune's reader (headers only), torch pickles with ``torch.load(weights_only=True,
   mmap=True)`` (nothing is executed; the tensors stay on disk until written). A nested
   ``model``/``state_dict``/``module``/``model_ema`` dict and a DDP ``module.`` prefix are
   taken off.
2. Names are brought to the library's own with the library's own checkpoint filter (timm's
   ``checkpoint_filter_fn`` of the model's module; for open_clip timm towers the trunk's
   filter on the ``visual.`` part). The filter first runs on ``meta`` placeholders, which
   says which output is a plain rename of which input; only the tensors it computes
   (a DINOv2 register ``cls_token``, a split ``qkv`` bias, ...) are computed for real.
3. Each MLP's hidden width and each attention layer's head count (at the architecture's
   head dim) are read from the tensor shapes, the architecture is built with them on
   ``meta`` and every name and shape is checked against it before any output exists.
4. The tensors are copied one at a time into ``model.safetensors`` (or shards), beside the
   library's config files, card and ``dgmr.json`` a streaming prune writes: ``dgmr.load`` and every
   command that takes a dgmr directory open it. Which neurons were kept is not known: there
   are no kept indices and the ``prune`` record says ``"unknown"``.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.dtypes import parse_dtype
from ..core.errors import DgmrError, first_line
from ..core.memory import PeakRss
from ..io.checkpoints import WEIGHTS, Checkpoint, TensorInfo, checkpoint_paths, match_names, open_checkpoint
from ..io.output import atomic_dir, claimed_output_dir
from ..io.writers import FileWriter, ShardWriter
from ..models.families import Family, apply_heads, apply_widths, family_of
from ..models.open import architecture_source, model_path
from ..models.sites.attention import AttentionSite
from ..models.sites.mlp import MlpSite
from ..models.sources import Source, build_model
from . import PruneRecord
from .stream.run import write_streamed_config
from .to_dir import prune_summary

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
NESTED_KEYS = ("model", "state_dict", "module", "model_ema")
SHARD_BYTES = 2 * 2**30  # Hugging Face layouts are written as shards of this size

# a computed (not renamed) output of a filter is either a tensor or the name of the input it renames
Origin = str | torch.Tensor


@dataclass
class Tensors:
    """A checkpoint's tensors by name (``module.`` taken off), read one at a time."""

    path: Path
    format: str
    infos: dict[str, TensorInfo]
    read: Callable[[str], torch.Tensor]
    notes: dict[str, Any] = field(default_factory=dict)


def _strip_module(names: list[str]) -> str:
    """``module.`` when every name carries it (a DDP-wrapped model's state dict)."""
    return "module." if names and all(n.startswith("module.") for n in names) else ""


def open_safetensors(path: Path) -> Tensors:
    ckpt = open_checkpoint(path)
    strip = _strip_module(list(ckpt.tensors))
    infos = {n[len(strip):]: info for n, info in ckpt.tensors.items()}
    notes = {"prefix_removed": strip} if strip else {}
    return Tensors(ckpt.path, "safetensors", infos, lambda n: ckpt.read([strip + n])[strip + n], notes)


def _torch_load(path: Path) -> Any:
    """``torch.load`` that never executes pickled code, memory-mapped where the format allows."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # legacy (pre-zip) files cannot be mapped: read them the ordinary way
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" not in text:
            raise DgmrError(f"cannot read {path} as a torch checkpoint (corrupt or not a torch file): "
                            f"{first_line(e)}") from None
        found = (re.search(r"Unsupported global: GLOBAL (\S+)", text)
                 or re.search(r"WeightsUnpickler error: (Unsupported[^\n.]+)", text))
        if found is None:  # torch words every failure alike: a file it cannot parse is not a code pickle
            raise DgmrError(f"cannot read {path} as a torch checkpoint (corrupt or not a torch file): "
                            f"{first_line(e)}") from None
        what = f" ({found.group(1)})"
        raise DgmrError(f"{path} is not a plain state dict: unpickling it would run code or build objects{what}, "
                        "and dgmr reads pickles only as tensors (torch.load weights_only=True) and never runs them. "
                        "Save the model's state_dict() or convert it to safetensors where it was made") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise DgmrError(f"cannot read {path} as a torch checkpoint (corrupt or not a torch file): "
                        f"{first_line(e)}") from None


def _state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(tensors, nesting keys followed, non-tensor keys dropped) of a loaded pickle."""
    nested: list[str] = []
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        nested.append(key)
        obj = obj[key]
    if not isinstance(obj, dict):
        raise DgmrError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    dropped = [str(k) for k in obj if str(k) not in tensors]
    if not tensors:
        raise DgmrError(f"{path} holds no tensors (top-level keys: {dropped[:8]}; "
                        f"looked under {', '.join(NESTED_KEYS)})")
    return tensors, nested, dropped


def open_pickle(path: Path) -> Tensors:
    sd, nested, dropped = _state_dict(_torch_load(path), path)
    strip = _strip_module(list(sd))
    sd = {n[len(strip):]: t for n, t in sd.items()}
    infos = {n: TensorInfo(path, t.dtype, tuple(t.shape)) for n, t in sd.items()}
    notes = {k: v for k, v in (("nested_under", ".".join(nested)), ("prefix_removed", strip),
                               ("ignored_entries", dropped[:20])) if v}
    return Tensors(path, "torch pickle", infos, sd.__getitem__, notes)


def open_tensors(checkpoint: str | os.PathLike) -> Tensors:
    """A safetensors file / index / directory, or a torch pickle (by its suffix)."""
    path = Path(checkpoint)
    if path.is_file() and (path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_torch(path)):
        return open_pickle(path)
    return open_safetensors(path)


def _looks_like_torch(path: Path) -> bool:
    """A torch file whatever its name (releases use ``*.pth.tar``): a zip archive (torch.save's
    format) or a raw pickle (protocol 2+ starts with 0x80); safetensors starts with a length."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


# ---------------------------------------------------------------------------------------
# names: the library's own checkpoint filter
def library_filter(module: nn.Module) -> Callable | None:
    """timm's ``checkpoint_filter_fn`` of the module defining ``module``'s class, if any."""
    if not type(module).__module__.startswith("timm."):
        return None
    return getattr(sys.modules.get(type(module).__module__), "checkpoint_filter_fn", None)


def _placeholders(tensors: Tensors, names: list[str], model: nn.Module) -> dict[str, torch.Tensor]:
    ph = {n: torch.empty(tensors.infos[n].shape, dtype=tensors.infos[n].dtype, device="meta") for n in names}
    # timm's ViT filter tells an original DINOv2 checkpoint by its mask_token, which a pruned
    # export may lack: a placeholder (the filter drops it) lets it recognise the w12/w3 naming
    # (not for EVA: its filter reads a mask_token as a MIM checkpoint's)
    if (type(model).__module__ == "timm.models.vision_transformer" and "mask_token" not in ph
            and any(re.match(r"blocks\.\d+\.mlp\.w12\.", n) for n in ph)
            and getattr(model, "cls_token", None) is not None):
        ph["mask_token"] = torch.empty(model.cls_token.shape[-1:], device="meta")
    return ph


def apply_filter(fn: Callable, tensors: Tensors, names: list[str], model: nn.Module) -> dict[str, Origin]:
    """Run ``fn(state_dict, model)`` on ``names``: {output name: input name it renames, or the
    tensor it computes}. The first pass runs on meta placeholders (no weights read); the
    outputs that are not an input object are computed in a second pass in which only the
    inputs not passed through unchanged are real."""
    ph = _placeholders(tensors, names, model)
    try:
        out = fn(dict(ph), model)
        back = {id(t): n for n, t in ph.items()}
        origin: dict[str, Origin] = {k: back[id(v)] for k, v in out.items() if id(v) in back}
        computed = [k for k in out if k not in origin]
        if computed:
            used = set(origin.values())
            real = {n: (tensors.read(n) if n not in used and n in tensors.infos else t) for n, t in ph.items()}
            again = fn(real, model)
            for k in computed:
                if k not in again or again[k].is_meta:
                    raise DgmrError(f"the checkpoint filter computes {k!r} from tensors it also passes through")
                origin[k] = again[k]
    except DgmrError:
        raise
    except Exception as e:  # a library's filter raises whatever it raises on a checkpoint it cannot read
        raise DgmrError(f"{tensors.path}: {type(model).__module__}.checkpoint_filter_fn failed: {first_line(e)}") from e
    return origin


def library_names(tensors: Tensors, meta: nn.Module, family: Family) -> dict[str, Origin]:
    """{name in the library's convention: input name or computed tensor} for every tensor kept."""
    names = list(tensors.infos)
    identity: dict[str, Origin] = {n: n for n in names}
    fn = library_filter(meta)
    if fn is not None:  # a timm model: its filter knows the original and open_clip namings
        return apply_filter(fn, tensors, names, meta)
    trunk = getattr(getattr(meta, "visual", None), "trunk", None)
    fn = library_filter(trunk) if trunk is not None else None
    if fn is None:
        return identity
    # an open_clip timm tower (EVA-CLIP): the visual part, unless already named visual.trunk.*,
    # is in the trunk's original naming; the rest (text tower) is open_clip's own
    whole = any(n.startswith("visual.") for n in names)
    pre = "visual." if whole else ""
    visual = [n for n in names if n.startswith(pre)]
    if any(n[len(pre):].startswith("trunk.") for n in visual):
        return identity
    sub = Tensors(tensors.path, tensors.format, {n[len(pre):]: tensors.infos[n] for n in visual},
                  lambda n: tensors.read(pre + n))
    origin = {f"{pre}trunk.{k}": (pre + v if isinstance(v, str) else v)
              for k, v in apply_filter(fn, sub, list(sub.infos), trunk).items()}
    in_visual = set(visual)
    return {**{n: n for n in names if n not in in_visual}, **origin}


# ---------------------------------------------------------------------------------------
# widths: read from the shapes
def _shape_of(names: dict[str, Origin], tensors: Tensors, name: str) -> tuple[int, ...]:
    o = names[name]
    return tuple(o.shape) if isinstance(o, torch.Tensor) else tensors.infos[o].shape


def _label(names: dict[str, Origin], name: str) -> str:
    """How the user's checkpoint names tensor ``name`` (its original name when renamed)."""
    o = names[name]
    return repr(o) if isinstance(o, str) else f"{name!r} (computed by the checkpoint filter)"


def _locate(names: dict[str, Origin], model_name: str, tower: str, tensors: Tensors, what: str) -> str:
    """The checkpoint's (library-named) tensor for ``model_name``: as in the whole model, or as
    in the vision tower ``tower`` alone."""
    if model_name in names:
        return model_name
    if tower and model_name.startswith(tower + ".") and model_name[len(tower) + 1:] in names:
        return model_name[len(tower) + 1:]
    seen = ", ".join(repr(n) for n in list(tensors.infos)[:3])
    raise DgmrError(f"{tensors.path} has no tensor for {model_name!r} ({what}); its names look like {seen} "
                    "(wrong SPEC or --model-kwargs, or a naming dgmr does not know?)")


def read_widths(sites: list[MlpSite], modules: dict[int, str], names: dict[str, Origin], tensors: Tensors,
                tower: str) -> dict[str, int]:
    """Each MLP's hidden width from the checkpoint's shapes: up rows (half of them for packed
    gate/up), which the gate rows, the down columns and any hidden-dim norm must agree with."""
    widths = {}
    for s in sites:
        def get(m: nn.Module, role: str) -> tuple[str, tuple[int, ...]]:
            n = _locate(names, f"{modules[id(m)]}.weight", tower, tensors, f"{role} of the MLP {s.name}")
            return _label(names, n), _shape_of(names, tensors, n)

        up, shape = get(s.up, "up projection")
        h = shape[0] // 2 if s.packed else shape[0]
        if s.packed and shape[0] % 2:
            raise DgmrError(f"{up} has {shape[0]} rows: a packed gate/up weight needs an even number (2 x hidden)")
        checks = [(s.gate, "gate projection", 0, "rows")] if s.gate is not None else []
        checks += [(n, "hidden-dim norm", 0, "entries") for n in s.norms] + [(s.down, "down projection", 1, "columns")]
        for m, role, dim, unit in checks:
            name, sh = get(m, role)
            if len(sh) <= dim or sh[dim] != h:
                raise DgmrError(f"{name} ({role} of {s.name}) has shape {list(sh)}: it needs {h} {unit}, "
                                f"the hidden width of the up projection {up} (shape {list(shape)})")
        if not 0 < h <= s.hidden:
            raise DgmrError(f"{up} gives {s.name} a hidden width of {h}; the architecture allows 1..{s.hidden}")
        widths[s.name] = h
    return widths


def read_heads(sites: list[AttentionSite], modules: dict[int, str], names: dict[str, Origin], tensors: Tensors,
               tower: str, saved: set[str]) -> dict[str, int]:
    """Each attention layer's head count from the checkpoint's shapes at the layer's head dim:
    the rows of its first q/k/v weight, which every other q/k/v row tensor, the output
    projection's columns, width norms and per-head tables must agree with (``saved``: the
    state dict's names; a non-persistent buffer such as EVA's zero k bias is not in a checkpoint)."""
    heads = {}
    for s in sites:
        def get(m: nn.Module, attr: str, role: str) -> tuple[str, tuple[int, ...]] | None:
            model_name = f"{modules[id(m)]}.{attr}" if modules[id(m)] else attr
            if model_name not in saved:
                return None
            n = _locate(names, model_name, tower, tensors, f"{role} of the attention layer {s.name}")
            return _label(names, n), _shape_of(names, tensors, n)

        first = next((o, n, layout) for o, n, layout in s.rows if getattr(o, n).ndim == 2)
        label, shape = get(first[0], first[1], "q/k/v weight")  # type: ignore[misc]
        per_head = len(first[2]) * s.head_dim
        h = shape[0] // per_head
        if shape[0] % per_head or not 0 < h <= s.heads:
            raise DgmrError(f"{label} has the wrong shape {list(shape)}: its rows are not {len(first[2])} x heads x "
                            f"{s.head_dim} for 1..{s.heads} heads of {s.head_dim} channels, as {s.name} holds "
                            "(wrong SPEC, --model-kwargs or CHECKPOINT?)")
        checks = [(o, n, 0, len(layout) * h * s.head_dim, "q/k/v rows") for o, n, layout in s.rows]
        checks += [(s.proj, "weight", 1, h * s.head_dim, "output projection columns")]
        checks += [(o, n, dim, h, "per-head table entries") for o, n, dim in s.tables]
        checks += [(norm, n, 0, h * s.head_dim, "width-norm entries") for norm in s.norms
                   for n, t in norm.named_parameters(recurse=False)]
        for m, attr, dim, want, what in checks:
            got = get(m, attr, what)
            if got is not None and (len(got[1]) <= dim or got[1][dim] != want):
                raise DgmrError(f"{got[0]} has the wrong shape {list(got[1])}: as {what} of {s.name} with {h} heads of "
                                f"{s.head_dim} channels ({label} has shape {list(shape)}) it needs {want} along dim "
                                f"{dim} (wrong SPEC, --model-kwargs or CHECKPOINT?)")
        heads[s.name] = h
    return heads


# ---------------------------------------------------------------------------------------
# the import
@dataclass
class ImportJob:
    """Everything decided before a weight is read (:func:`plan_import`)."""

    src: Source
    tensors: Tensors
    model: nn.Module  # the architecture on meta, cut to the checkpoint's widths
    family: Family
    names: dict[str, Origin]  # model state-dict name -> input name or computed tensor
    scope: str | None
    layout: str
    out_dtype: torch.dtype | None
    record: PruneRecord
    params_before: int

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every output tensor, in the model's order."""
        out = []
        for n, o in self.names.items():
            dt = o.dtype if isinstance(o, torch.Tensor) else self.tensors.infos[o].dtype
            shape = tuple(o.shape) if isinstance(o, torch.Tensor) else self.tensors.infos[o].shape
            out.append((n, self.out_dtype if self.out_dtype is not None and dt.is_floating_point else dt, shape))
        return out

    def tensor(self, name: str) -> torch.Tensor:
        o = self.names[name]
        t = o if isinstance(o, torch.Tensor) else self.tensors.read(o)
        return t.to(self.out_dtype) if self.out_dtype is not None and t.is_floating_point() else t


def _record(sites: list[MlpSite], hidden_before: list[int], attention: list[AttentionSite],
            heads_before: list[int]) -> PruneRecord:
    """The ``prune`` record of an import: widths and heads known, criterion and kept neurons/heads not."""
    record = PruneRecord("unknown", None, {"kept_indices": "unknown"})  # type: ignore[arg-type]
    for s, h in zip(sites, hidden_before):
        record.add(s, h, None)
    for a, h in zip(attention, heads_before):
        if a.heads != h:
            record.add_heads(a, h, None)
    return record


def plan_import(spec: str | Source, checkpoint: str | os.PathLike, *, model_kwargs: dict[str, Any] | None = None,
                dtype: str | None = None, native: bool = True) -> ImportJob:
    """Open, rename and check everything; reads no weight (except tensors a filter computes)."""
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    src = architecture_source(spec, model_kwargs=model_kwargs, role="SPEC")
    tensors = open_tensors(checkpoint)
    meta = build_model(src, pretrained=False, meta=True)
    family = family_of(meta)
    tower = family.vision_root(meta)[0]
    params_before = family.vision_params(meta)
    names = library_names(tensors, meta, family)
    sites = family.mlps(meta)
    before = [s.hidden for s in sites]
    attention = family.attention(meta)
    heads_before = [a.heads for a in attention]
    modules = {id(m): n for n, m in meta.named_modules()}
    heads = read_heads(attention, modules, names, tensors, tower, set(meta.state_dict()))
    apply_widths(meta, read_widths(sites, modules, names, tensors, tower), family)
    apply_heads(meta, heads, family)
    family.update_config(meta, src)
    sites = family.mlps(meta)
    attention = family.attention(meta)
    state = meta.state_dict()
    derived = frozenset(n for n, _ in meta.named_buffers()) - set(state)
    shapes = {n: _shape_of(names, tensors, n) for n in names}
    infos = Checkpoint(tensors.path, {n: TensorInfo(tensors.path, torch.float32, s) for n, s in shapes.items()})
    matched, scope = match_names(infos, {k: tuple(v.shape) for k, v in state.items()}, tower, derived,
                                 hint="wrong SPEC, --model-kwargs or CHECKPOINT?")
    layout = family.stream_layout(meta, tower_only=scope is not None, native=native, sharded=False)
    return ImportJob(src, tensors, meta, family, {n: names[c] for n, c in matched.items()}, scope, layout, out_dtype,
                     _record(sites, before, attention, heads_before), params_before)


def write_import(job: ImportJob, tmp: Path, native: bool) -> tuple[dict[str, Any], int]:
    """Copy the tensors one at a time into ``tmp`` and write the native export, the card and dgmr.json."""
    if job.layout == "file":
        writer: FileWriter | ShardWriter = FileWriter(tmp / WEIGHTS, job.entries())
    else:
        writer = ShardWriter(tmp, SHARD_BYTES)
    for name in job.names:
        writer.add(name, job.tensor(name))
    files = writer.finish()
    config = write_streamed_config(
        tmp, family=job.family, meta=job.model, src=job.src, layout=job.layout, scope=job.scope, record=job.record,
        native=native, dtypes={dt for _, dt, _ in job.entries() if dt.is_floating_point},
        params_before=job.params_before, files=files,
        extra={"imported_from": {"checkpoint": str(job.tensors.path), "format": job.tensors.format,
                                 **job.tensors.notes}})
    return config, writer.total


def import_checkpoint(spec: str | Source, checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                      model_kwargs: dict[str, Any] | None = None, dtype: str | None = None,
                      overwrite: bool = False, native: bool = True) -> dict[str, Any]:
    """Make the dgmr directory ``out`` from a checkpoint of ``spec``'s architecture whose MLPs
    were pruned elsewhere (any per-layer widths, read from the tensor shapes).

    ``checkpoint`` is a safetensors file, ``model.safetensors.index.json`` or directory, or a
    torch pickle (``.pth``/``.pt``/``.bin``) holding a plain state dict (read with
    ``weights_only=True``, memory-mapped; a pickle that needs code to load is refused),
    possibly nested under ``model``/``state_dict``/``module``/``model_ema`` and with a
    ``module.`` prefix; it holds the whole model or the vision tower alone, in the library's
    naming or one its checkpoint filter converts (original EVA-CLIP, DINOv2). ``dtype`` casts
    the floating weights. The output is what ``dgmr prune`` writes, without
    kept indices (unknown). Returns a summary (the ``dgmr import`` output).
    """
    t0 = time.perf_counter()
    inputs = [("model", model_path(spec)), *[("checkpoint", c) for c in checkpoint_paths(checkpoint)]]
    with claimed_output_dir(out, inputs, overwrite):  # one writer from the emptiness check to the rename into place
        job = plan_import(spec, checkpoint, model_kwargs=model_kwargs, dtype=dtype, native=native)
        with PeakRss() as rss, atomic_dir(out, overwrite) as tmp:
            config, out_bytes = write_import(job, tmp, native)
    return prune_summary(out, job.src.spec, job.family, "unknown", config["widths"], job.params_before,
                         config["params_after"], config["native_export"], t0, checkpoint=str(job.tensors.path),
                         checkpoint_format=job.tensors.format, output_bytes=out_bytes, weights_scope=job.scope,
                         peak_rss_bytes=rss.peak)
