"""Streaming prune: cut a safetensors checkpoint one MLP at a time, in bounded memory.

The architecture comes from the model spec, built on the ``meta`` device (no memory, no
download); the weights come from a safetensors file or a sharded Hugging Face style
``model.safetensors.index.json``. Every tensor is read on its own when it is needed, so
the resident set stays about one MLP (its weights, the float64 scoring matrix and the
selection workspace) plus one output shard, whatever the checkpoint's size:

1. the checkpoint's header (names, dtypes, shapes) is checked against the meta model's
   state dict: a missing, unexpected or wrongly shaped tensor, or a truncated file, is a
   :class:`~dgmr.errors.DgmrError` before any output exists;
2. each MLP's tensors are loaded into that MLP's (otherwise meta) module, scored with
   :func:`dgmr.select_neurons` and cut with :func:`dgmr.shrink_mlp`: the very code of the
   in-memory :func:`dgmr.prune`, so the result is the same bit for bit;
3. every other tensor is copied through unchanged; output shards are written as they fill
   (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, or one
   ``model.safetensors`` when everything fits one shard), all inside a temporary
   directory that is renamed into place only on success, next to the usual dgmr
   ``config.json`` and ``kept_indices.safetensors``, so :func:`dgmr.load` opens it.

Several MLPs are selected at once (threads) when the cores and ``max_memory`` allow it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import psutil
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .artifact import CONFIG, INDICES, SHARD_INDEX as INDEX, WEIGHTS, atomic_dir, check_output_dir, write_json
from .criteria import _BLOCK as BLOCK, _CACHE as CACHE, _POOL as POOL, get_criterion, select_neurons
from .errors import DgmrError
from .families import Family, OpenClipFamily, apply_widths, family_of
from .memory import PeakRss
from .mlp import MlpSite, shrink_mlp
from .prune import PruneRecord, resolve_widths
from .sources import Source, build_model, is_dgmr_dir, parse_spec

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


# ---------------------------------------------------------------------------------------
# the input checkpoint
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
                derived: frozenset[str] = frozenset()) -> tuple[dict[str, str], str | None]:
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
                        " (wrong MODEL, --model-kwargs or --weights?)")
    return {n: have[n] for n in want}, scope


# ---------------------------------------------------------------------------------------
# memory plan
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


def _mlp_bytes(site: MlpSite, infos: Mapping[str, TensorInfo], names: Sequence[str], score_bytes: int) -> int:
    """Peak bytes one MLP's selection holds: its weights (twice: read + cut), the scoring
    matrix and the selection workspace of :func:`dgmr.criteria.pivot_order` (its float32
    copy of the scoring matrix, the projected rows of the second leg, the pivot directions
    in both precisions, the pool and its block coefficients, the residual cache, per-row
    temporaries)."""
    raw = sum(infos[n].nbytes for n in names)
    w1 = site.up.weight
    h = site.hidden
    d = w1.shape[1] * (2 if site.gated else 1)
    n = min(h, d)
    score = h * d * score_bytes
    # (h * d * score_bytes: the projected rows when the round continues in the complement)
    workspace = (h * d * (4 + score_bytes) + n * d * (score_bytes + 4) + (2 * POOL + CACHE) * d * score_bytes
                 + POOL * BLOCK * score_bytes + h * 64 * score_bytes)
    return 2 * raw + 2 * score + workspace


def make_plan(max_memory: int | None, per_mlp: int, largest: int, n_mlps: int,
              workers: int | None = None, shard_bytes: int | None = None, buffered: bool = True) -> Plan:
    """Shard size and workers within ``max_memory``; ``buffered``: output shards are held in
    memory until written (the one-file layout streams each tensor out instead)."""
    baseline = psutil.Process().memory_info().rss
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    auto_workers = max(1, min(4, cpus // 4))  # GEMMs already use every core; extra layers help on big boxes
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


# ---------------------------------------------------------------------------------------
# output shards
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
        self.f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.next += 1

    def finish(self) -> list[str]:
        self.f.close()
        if self.next != len(self.entries):
            raise AssertionError(f"stream writer: {len(self.entries) - self.next} tensors never came")
        return [self.path.name]


# ---------------------------------------------------------------------------------------
# the streaming prune
def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _site_tensors(site: MlpSite, modules: dict[int, str]) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, state-dict name) of every parameter :func:`shrink_mlp` touches."""
    out = []
    for m in [site.up, site.gate, *site.norms, site.down]:
        if m is None:
            continue
        for pname, _ in m.named_parameters(recurse=False):
            prefix = modules[id(m)]
            out.append((m, pname, f"{prefix}.{pname}" if prefix else pname))
    return out


def _cut_one(site: MlpSite, k: int, tensors: list[tuple[nn.Module, str, str]], values: dict[str, torch.Tensor],
             criterion: str, seed: int, select_device: torch.device | None,
             select_dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """Load one MLP's weights into its meta module, select, cut; return (kept, cut tensors,
    selection seconds) and put meta tensors of the new shapes back so no weight stays referenced."""
    for m, pname, name in tensors:
        setattr(m, pname, nn.Parameter(values.pop(name), requires_grad=False))
    w1, w_gate = site.scoring_weights()
    if select_device is not None:
        w1 = w1.to(select_device)
        w_gate = w_gate.to(select_device) if w_gate is not None else None
    with torch.no_grad():
        t = time.perf_counter()
        try:
            keep = select_neurons(w1, k, criterion, w_gate=w_gate, seed=seed, dtype=select_dtype)
        except DgmrError as e:
            raise DgmrError(f"{site.name}: {e}") from None
        seconds = time.perf_counter() - t
        del w1, w_gate
        shrink_mlp(site, keep)
    out = {}
    for m, pname, name in tensors:
        p = getattr(m, pname)
        out[name] = p.detach()
        setattr(m, pname, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))
    return keep, out, seconds


def stream_prune(
    model: str | Source,
    weights: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mlp_ratio: float | None = None,
    hidden: int | None = None,
    keep_fraction: float | None = None,
    widths: Mapping[str, int] | Sequence[int] | None = None,
    criterion: str = "diversity",
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    dtype: str | None = None,
    max_memory: int | str | None = None,
    workers: int | None = None,
    shard_size: int | str | None = None,
    select_device: str | torch.device | None = None,
    select_dtype: str = "float64",
    overwrite: bool = False,
    native: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune the safetensors checkpoint ``weights`` of architecture ``model`` into ``out``.

    ``model`` is a spec (``timm:NAME``, ``open_clip:ARCH``, ``hf:ID_OR_DIR``) or a
    :class:`Source`; it is only built on the ``meta`` device. Widths and ``criterion`` mean
    what they mean for :func:`dgmr.prune`. ``max_memory`` (bytes or ``"3GB"``) bounds the
    resident set: it sizes the output shards and how many MLPs are selected at once
    (``workers``, default: by core count), and is refused up front when one MLP cannot fit.
    ``select_device`` runs the selection there (e.g. ``"cuda"``) while everything else
    stays on the CPU; ``select_dtype`` is its compute dtype (``float64`` by default, as in
    :func:`dgmr.prune`, which makes the two bit-for-bit equal; ``float32`` is faster but can
    depart from the exact greedy order where two residual norms tie to ~1e-6). Returns a summary dict (also the ``dgmr prune --weights`` output).
    """
    t0 = time.perf_counter()
    get_criterion(criterion)
    if dtype is not None and dtype not in OUT_DTYPES:
        raise DgmrError(f"unknown dtype {dtype!r}; choose one of {', '.join(OUT_DTYPES)}")
    if isinstance(model, Source):
        src = model
    else:
        if is_dgmr_dir(model) or os.path.isdir(str(model)):
            raise DgmrError(f"with --weights, MODEL must be an architecture spec (timm:NAME, open_clip:ARCH, "
                            f"hf:DIR), not the directory {model}")
        src = parse_spec(str(model), model_kwargs)
    max_bytes = parse_size(max_memory) if max_memory is not None else None
    shard_bytes = parse_size(shard_size) if shard_size is not None else None
    dev = torch.device(select_device) if select_device is not None else None
    if select_dtype not in ("float32", "float64"):
        raise DgmrError(f"selection dtype must be float32 or float64, got {select_dtype!r}")
    sel_dtype = getattr(torch, select_dtype)
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise DgmrError("selection on cuda was asked for but no CUDA device is available")
    check_output_dir(out, overwrite)
    ckpt = open_checkpoint(weights)

    meta = build_model(src, pretrained=False, meta=True)
    family = family_of(meta)
    tower = family.vision_root(meta)[0]
    state = meta.state_dict()
    derived = frozenset(n for n, _ in meta.named_buffers()) - set(state)
    names, scope = match_names(ckpt, {k: tuple(v.shape) for k, v in state.items()}, tower, derived)
    sites = family.mlps(meta)
    ks = resolve_widths(sites, mlp_ratio=mlp_ratio, hidden=hidden, keep_fraction=keep_fraction, widths=widths)
    hidden_before = [s.hidden for s in sites]
    modules = _param_names(meta)
    site_tensors = [_site_tensors(s, modules) for s in sites]
    owned = {name for ts in site_tensors for _, _, name in ts}
    params_before = sum(p.numel() for p in family.vision_root(meta)[1].parameters())
    info = {n: ckpt.tensors[c] for n, c in names.items()}  # by model name

    def read(ns: Sequence[str]) -> dict[str, torch.Tensor]:
        got = ckpt.read([names[n] for n in ns])
        return {n: got[names[n]] for n in ns}

    per_mlp = max((_mlp_bytes(s, info, [n for _, _, n in ts], sel_dtype.itemsize) for s, ts in zip(sites, site_tensors)),
                  default=0)
    largest = max((info[n].nbytes for n in names if n not in owned), default=0)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t

    # writing order: the model's, each MLP's tensors together where its first one stands
    first_of = {ts[0][2]: i for i, ts in enumerate(site_tensors)}
    order: list[str] = []
    for name in names:
        if name not in owned:
            order.append(name)
        elif name in first_of:
            order += [n for _, _, n in site_tensors[first_of[name]]]
    # the output's shapes, known before any weight is read (a meta copy cut to the widths)
    shaped = copy.deepcopy(meta)
    apply_widths(shaped, {s.name: k for s, k in zip(sites, ks)}, family)
    out_shapes = {k: tuple(v.shape) for k, v in shaped.state_dict().items()}
    layout = _layout(family, shaped, scope, native, shard_bytes)
    plan = make_plan(max_bytes, per_mlp, largest, len(sites), workers, shard_bytes, buffered=layout != "file")
    out_dtype = OUT_DTYPES[dtype] if dtype is not None else None

    request = {k: v for k, v in (("mlp_ratio", mlp_ratio), ("hidden", hidden), ("keep_fraction", keep_fraction)) if v is not None}
    record = PruneRecord(criterion, seed, request)

    def job(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        ns = [n for _, _, n in site_tensors[i]]
        return _cut_one(sites[i], ks[i], site_tensors[i], read(ns), criterion, seed + i, dev, sel_dtype)

    bar = tqdm(total=len(sites), desc=f"stream prune ({criterion})", unit="block", disable=not progress, leave=False)
    with bar, PeakRss() as rss, atomic_dir(out, overwrite) as tmp, ThreadPoolExecutor(plan.workers) as pool:
        if layout == "file":
            writer: ShardWriter | FileWriter = FileWriter(tmp / WEIGHTS, [
                (n, out_dtype if out_dtype is not None and info[n].dtype.is_floating_point else info[n].dtype,
                 out_shapes[n]) for n in order])
        else:
            writer = ShardWriter(tmp, plan.shard_bytes, sub="hf" if layout == "hf" else "")
        pending: dict[int, Future] = {}
        nxt = 0  # next site to submit: at most plan.workers in flight

        def submit_upto(limit: int) -> None:
            nonlocal nxt
            while nxt < len(sites) and nxt < limit:
                pending[nxt] = pool.submit(job, nxt)
                nxt += 1

        for name in names:
            if name in owned:
                i = first_of.get(name)
                if i is None:
                    continue  # written with its MLP
                submit_upto(i + plan.workers)
                keep, cut, sel_s = pending.pop(i).result()
                for n, t in cut.items():
                    writer.add(n, cast(t))
                del cut
                record.layers.append({"name": sites[i].name, "kind": sites[i].kind,
                                      "in_features": sites[i].in_features, "hidden_before": hidden_before[i],
                                      "hidden_after": ks[i], "select_seconds": round(sel_s, 4), "kept": keep})
                bar.update(1)
            else:
                writer.add(name, cast(read([name])[name]))
        files = writer.finish()
        order_of = {s.name: i for i, s in enumerate(sites)}
        record.layers.sort(key=lambda layer: order_of[layer["name"]])
        record.config_updates = family.update_config(meta, src)
        save_file({layer["name"]: layer["kept"].contiguous() for layer in record.layers}, str(tmp / INDICES))
        params_after = sum(p.numel() for p in family.vision_root(meta)[1].parameters())
        native = (_native_export(family, meta, tmp, src, layout, scope) if native
                  else {"skipped": "native export turned off"})
        in_dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in ckpt.tensors.values() if t.dtype.is_floating_point})
        config = {
            "format": "dgmr",
            "dgmr_version": __version__,
            "spec": src.spec,
            "source": src.to_dict(),
            "family": family.name,
            "class": type(meta).__name__,
            "dtype": dtype or (in_dtypes[0] if len(in_dtypes) == 1 else "float32"),
            "widths": {s.name: s.hidden for s in sites},
            "vision_params": params_after,
            "prune": record.to_json(),
            "native_export": native,
            "params_before": params_before,
            "params_after": params_after,
            "random_init": False,
            "weights_from": str(Path(weights)),
            "weights": files[-1],
            "files": files,
            "stream": {**plan.to_json(), "select_dtype": select_dtype, "layout": layout},
        }
        if scope is not None:
            config["weights_scope"] = scope
        write_json(tmp / CONFIG, config)
    seconds = time.perf_counter() - t0
    widths_after = sorted(set(config["widths"].values()))
    return {
        "out": str(Path(out)),
        "model": src.spec,
        "weights": str(Path(weights)),
        "family": family.name,
        "criterion": criterion,
        "mlp_layers": len(sites),
        "hidden_after": widths_after,
        "params_before": params_before,
        "params_after": params_after,
        "param_reduction": 1 - params_after / params_before if params_before else 0.0,
        "checkpoint_bytes": ckpt.nbytes,
        "output_bytes": writer.total,
        "files": len(files),
        "weights_scope": scope,
        "workers": plan.workers,
        "peak_rss_bytes": rss.peak,
        "native_export": native.get("load", native.get("skipped")),
        "seconds": round(seconds, 2),
    }


def _layout(family: Family, shaped: nn.Module, scope: str | None, native: bool, shard_bytes: int | None) -> str:
    """Where the weights go: ``file`` (one streamed ``model.safetensors``: timm's and
    open_clip's loaders read one file), ``hf`` (shards in ``hf/`` beside a transformers
    config: ``from_pretrained`` reads them), or ``shards`` (HF-style shards at the top)."""
    if native and scope is None and family.name == "hf":
        fields, _ = family._width_fields(shaped, family.mlps(shaped))
        return "hf" if fields is not None else "shards"
    return "shards" if shard_bytes is not None else "file"


def _native_export(family: Family, meta: nn.Module, tmp: Path, src: Source, layout: str,
                   scope: str | None) -> dict[str, Any]:
    """The source library's own format, written from the meta model's config (no weights needed)."""
    timm_tower = isinstance(family, OpenClipFamily) and family._is_timm_tower(meta)
    if scope is not None and not timm_tower:
        return {"skipped": f"the checkpoint holds only {scope!r}: dgmr.load returns that tower"}
    if family.name == "hf":
        if layout != "hf":
            return {"skipped": family._width_fields(meta, family.mlps(meta))[1]}
        meta.config.save_pretrained(tmp / "hf")
        return {"format": "transformers from_pretrained", "files": ["hf/"],
                "load": f"transformers.{type(meta).__name__}.from_pretrained('DIR/hf')"}
    if layout != "file":
        return {"skipped": "sharded output (--shard-size): timm/open_clip loaders read one file; use dgmr.load"}
    try:
        if timm_tower:  # timm reads the trunk straight from model.safetensors (it strips visual.trunk.)
            return family.export_trunk(meta, tmp, src, separate_weights=False)
        return family.export_native(meta, tmp, src)
    except (DgmrError, RuntimeError, ValueError, NotImplementedError) as e:
        return {"skipped": f"native export failed on the meta model: {str(e).splitlines()[0] if str(e) else type(e).__name__}"}
