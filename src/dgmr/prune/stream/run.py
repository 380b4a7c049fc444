"""The streaming prune itself: plan, then cut MLP by MLP (and attention layer by attention
layer, with ``--heads``), then write the dgmr directory."""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.dtypes import dtype_name, parse_dtype
from ...core.errors import DgmrError
from ...core.memory import PeakRss, release_freed
from ...io.checkpoints import WEIGHTS, Checkpoint, checkpoint_paths, match_names, open_checkpoint
from ...io.output import atomic_dir, claimed_output_dir
from ...io.writers import FileWriter, ShardWriter
from ...models.artifact import write_kept_indices, write_streamed_config
from ...models.families import Family, apply_heads, apply_widths, family_of
from ...models.open import architecture_source, model_path
from ...models.sites.attention import AttentionSite, shrink_heads
from ...models.sites.mlp import MlpSite, shrink_mlp
from ...models.sources import Source, build_model
from .. import PruneRecord, resolve_heads, resolve_widths
from ..criteria import get_criterion, select_neurons
from ..head_criteria import get_head_criterion, select_heads
from ..settings import PruneSettings
from ..to_dir import prune_summary
from .plan import Plan, attention_bytes, make_plan, mlp_bytes, parse_size

Site = MlpSite | AttentionSite


def _site_tensors(site: Site, modules: dict[int, str], saved: set[str]) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, state-dict name) of every tensor :func:`shrink_mlp` or
    :func:`shrink_heads` touches that the checkpoint holds (``saved``: the state dict's names)."""
    pairs = ([(m, pname) for m in site.parts for pname, _ in m.named_parameters(recurse=False)]
             if isinstance(site, MlpSite) else site.tensors())
    out = []
    for m, pname in pairs:
        prefix = modules[id(m)]
        name = f"{prefix}.{pname}" if prefix else pname
        if name in saved and all(n != name for _, _, n in out):
            out.append((m, pname, name))
    return out


def _cut_heads_one(site: AttentionSite, k: int, tensors: list[tuple[nn.Module, str, str]],
                   values: dict[str, torch.Tensor], criterion: str, seed: int, select_device: torch.device | None,
                   select_dtype: torch.dtype, root: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """:func:`_cut_one` for an attention layer: its tensors are read back by name from ``root``,
    since the cut may put a new module in the layer's place."""
    for m, pname, name in tensors:
        t = values.pop(name)
        setattr(m, pname, nn.Parameter(t, requires_grad=False) if pname in m._parameters else t)
    blocks = site.scoring_blocks()
    blocks = blocks.to(select_device) if select_device is not None else blocks
    with torch.no_grad():
        t0 = time.perf_counter()
        try:
            keep = select_heads(blocks, k, criterion, seed=seed, dtype=select_dtype)
        except DgmrError as e:
            raise DgmrError(f"{site.name}: {e}") from None
        seconds = time.perf_counter() - t0
        del blocks
        release_freed()
        shrink_heads(site, keep)
    out = {}
    for _, _, name in tensors:
        owner, _, pname = name.rpartition(".")
        m = root.get_submodule(owner)
        t = getattr(m, pname)
        out[name] = t.detach()
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        setattr(m, pname, nn.Parameter(meta, requires_grad=False) if pname in m._parameters else meta)
    return keep, out, seconds


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
        release_freed()  # the scoring matrix and the selection's workspace
        shrink_mlp(site, keep)
    out = {}
    for m, pname, name in tensors:
        p = getattr(m, pname)
        out[name] = p.detach()
        setattr(m, pname, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))
    return keep, out, seconds


@dataclass
class StreamJob:
    """Everything a streaming prune decides before reading a weight (:func:`plan_stream`)."""

    src: Source
    weights: Path
    ckpt: Checkpoint
    meta: nn.Module  # the architecture on meta; each MLP is cut in it as the run goes
    family: Family
    names: dict[str, str]  # model state-dict name -> checkpoint name
    scope: str | None  # the tower's name when the checkpoint holds only the vision tower
    sites: list[Site]  # the MLPs and the attention layers whose heads are cut, in the checkpoint's order
    ks: list[int]  # hidden width per MLP, heads per attention layer
    site_tensors: list[list[tuple[nn.Module, str, str]]]
    order: list[str]  # writing order: the model's, each site's tensors together
    out_shapes: dict[str, tuple[int, ...]]
    out_dtype: torch.dtype | None
    layout: str
    plan: Plan
    criterion: str
    seed: int
    select_device: torch.device | None
    select_dtype: torch.dtype
    record: PruneRecord
    params_before: int
    head_index: dict[str, int] = dataclasses.field(default_factory=dict)  # attention layer -> its index (seeds, order)

    @property
    def owned(self) -> set[str]:
        return {name for ts in self.site_tensors for _, _, name in ts}

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        got = self.ckpt.read([self.names[n] for n in names])
        return {n: got[self.names[n]] for n in names}

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.out_dtype) if self.out_dtype is not None and t.is_floating_point() else t

    def out_entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every output tensor, in writing order."""
        infos = {n: self.ckpt.tensors[c] for n, c in self.names.items()}
        return [(n, self.out_dtype if self.out_dtype is not None and infos[n].dtype.is_floating_point
                 else infos[n].dtype, self.out_shapes[n]) for n in self.order]


def _select_where(select_device: str | torch.device | None, select_dtype: str) -> tuple[torch.device | None, torch.dtype]:
    dev = torch.device(select_device) if select_device is not None else None
    if select_dtype not in ("float32", "float64"):
        raise DgmrError(f"selection dtype must be float32 or float64, got {select_dtype!r}")
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise DgmrError("selection on cuda was asked for but no CUDA device is available")
    return dev, getattr(torch, select_dtype)


def _writing_order(names: Sequence[str], site_tensors: list[list[tuple[nn.Module, str, str]]]) -> list[str]:
    """The model's order, each MLP's tensors together where its first one stands."""
    owned = {name for ts in site_tensors for _, _, name in ts}
    first_of = {ts[0][2]: i for i, ts in enumerate(site_tensors)}
    order: list[str] = []
    for name in names:
        if name not in owned:
            order.append(name)
        elif name in first_of:
            order += [n for _, _, n in site_tensors[first_of[name]]]
    return order


def _stream_sites(meta: nn.Module, family: Family, widths: dict[str, Any], heads: dict[str, Any],
                  src: Source) -> tuple[list[Site], list[int], list[AttentionSite], list[int]]:
    """(MLPs and attention layers to cut, their widths / head counts; every attention layer and
    its head count), all checked before anything is read."""
    cut_mlps = bool(widths) or not heads
    sites: list[Site] = family.mlps(meta) if cut_mlps else []
    ks = resolve_widths(sites, **widths) if cut_mlps else []  # type: ignore[arg-type]
    attention = family.attention(meta) if heads else []
    hs = resolve_heads(attention, **heads, model=src.spec) if heads else []
    cut = [(a, k) for a, k in zip(attention, hs) if k != a.heads]
    return [*sites, *(a for a, _ in cut)], [*ks, *(k for _, k in cut)], attention, hs


def plan_stream(model: str | Source, weights: str | os.PathLike, *, widths: dict[str, Any], criterion: str,
                seed: int, model_kwargs: dict[str, Any] | None, dtype: str | None, max_memory: int | str | None,
                workers: int | None, shard_size: int | str | None, select_device: str | torch.device | None,
                select_dtype: str, native: bool, heads: dict[str, Any] | None = None) -> StreamJob:
    """Check everything and size the work; reads only checkpoint headers. ``widths`` holds
    the width request (``mlp_ratio``, ``hidden``, ``keep_fraction`` or ``widths``; empty:
    the MLPs stay), ``heads`` the head request (``heads`` or ``head_fraction``; empty: no head is cut)."""
    get_criterion(criterion)
    if heads:
        get_head_criterion(criterion)
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    src = architecture_source(model, model_kwargs=model_kwargs, role="with --weights, MODEL")
    max_bytes = parse_size(max_memory) if max_memory is not None else None
    shard_bytes = parse_size(shard_size) if shard_size is not None else None
    dev, sel_dtype = _select_where(select_device, select_dtype)
    ckpt = open_checkpoint(weights)
    meta = build_model(src, pretrained=False, meta=True)
    family = family_of(meta)
    state = meta.state_dict()
    derived = frozenset(n for n, _ in meta.named_buffers()) - set(state)
    names, scope = match_names(ckpt, {k: tuple(v.shape) for k, v in state.items()}, family.vision_root(meta)[0],
                               derived)
    sites, ks, attention, hs = _stream_sites(meta, family, widths, heads or {}, src)
    modules = {id(m): name for name, m in meta.named_modules()}
    site_tensors = [_site_tensors(s, modules, set(state)) for s in sites]
    # in the checkpoint's order: the sites in flight are always the next ones written
    position = {n: i for i, n in enumerate(names)}
    order = sorted(range(len(sites)), key=lambda i: position[site_tensors[i][0][2]])
    sites, ks, site_tensors = [sites[i] for i in order], [ks[i] for i in order], [site_tensors[i] for i in order]
    owned = {name for ts in site_tensors for _, _, name in ts}
    infos = {n: ckpt.tensors[c] for n, c in names.items()}
    per_mlp = max(((mlp_bytes if isinstance(s, MlpSite) else attention_bytes)(s, infos, [n for _, _, n in ts], sel_dtype)
                   for s, ts in zip(sites, site_tensors)), default=0)
    largest = max((infos[n].nbytes for n in names if n not in owned), default=0)
    shaped = copy.deepcopy(meta)  # the output's shapes, known before any weight is read
    apply_widths(shaped, {s.name: k for s, k in zip(sites, ks) if isinstance(s, MlpSite)}, family)
    apply_heads(shaped, {s.name: k for s, k in zip(attention, hs)}, family)
    layout = family.stream_layout(shaped, tower_only=scope is not None, native=native,
                                  sharded=shard_bytes is not None)
    plan = make_plan(max_bytes, per_mlp, largest, len(sites), workers, shard_bytes, buffered=layout != "file")
    request = {k: v for k, v in {**widths, **(heads or {})}.items() if k != "widths"}
    record = PruneRecord.start(criterion, seed, **request)
    for a, k in zip(attention, hs):  # layers that keep every head: recorded, not read
        if k == a.heads:
            record.add_heads(a, a.heads, torch.arange(k))
    return StreamJob(src, Path(weights), ckpt, meta, family, names, scope, sites, ks, site_tensors,
                     _writing_order(list(names), site_tensors), {k: tuple(v.shape) for k, v in shaped.state_dict().items()},
                     out_dtype, layout, plan, criterion, seed, dev, sel_dtype, record, family.vision_params(meta),
                     {a.name: i for i, a in enumerate(attention)})


def run_stream(job: StreamJob, tmp: Path, progress: bool) -> tuple[list[str], int]:
    """Cut every MLP (``plan.workers`` at once) and copy everything else into ``tmp``, in
    writing order; fills ``job.record``. Returns (files written, output bytes)."""
    if job.layout == "file":
        writer: ShardWriter | FileWriter = FileWriter(tmp / WEIGHTS, job.out_entries())
    else:
        writer = ShardWriter(tmp, job.plan.shard_bytes)
    owned = job.owned
    first_of = {ts[0][2]: i for i, ts in enumerate(job.site_tensors)}
    before = [s.hidden if isinstance(s, MlpSite) else s.heads for s in job.sites]
    mlp_index = {s.name: i for i, s in enumerate(s for s in job.sites if isinstance(s, MlpSite))}

    def cut(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        ns = [n for _, _, n in job.site_tensors[i]]
        site = job.sites[i]
        # seeds as in dgmr.prune: seed + the layer's index among the MLPs / attention layers
        if isinstance(site, AttentionSite):
            return _cut_heads_one(site, job.ks[i], job.site_tensors[i], job.read(ns), job.criterion,
                                  job.seed + job.head_index[site.name], job.select_device, job.select_dtype, job.meta)
        return _cut_one(site, job.ks[i], job.site_tensors[i], job.read(ns), job.criterion,
                        job.seed + mlp_index[site.name], job.select_device, job.select_dtype)

    pending: dict[int, Future] = {}
    nxt = 0  # the next MLP to submit
    bar = tqdm(total=len(job.sites), desc=f"stream prune ({job.criterion})", unit="block", disable=not progress,
               leave=False)
    with bar, ThreadPoolExecutor(job.plan.workers) as pool:
        for name in job.names:
            if name not in owned:
                writer.add(name, job.cast(job.read([name])[name]))
                continue
            i = first_of.get(name)
            if i is None:
                continue  # written with its MLP
            while nxt < min(len(job.sites), i + job.plan.workers):  # keep plan.workers MLPs in flight
                pending[nxt] = pool.submit(cut, nxt)
                nxt += 1
            keep, tensors, seconds = pending.pop(i).result()
            for n, t in tensors.items():
                writer.add(n, job.cast(t))
            del tensors
            release_freed()  # this MLP's weights, read and cut
            if isinstance(job.sites[i], MlpSite):
                job.record.add(job.sites[i], before[i], keep, select_seconds=round(seconds, 4))
            else:
                job.record.add_heads(job.sites[i], before[i], keep, select_seconds=round(seconds, 4))
            bar.update(1)
    return writer.finish(), writer.total


def write_stream_config(job: StreamJob, tmp: Path, files: list[str], native: bool) -> dict[str, Any]:
    """The kept indices, the native export, the card and dgmr.json, beside the weights in ``tmp``."""
    order_of = {s.name: i for i, s in enumerate(s for s in job.sites if isinstance(s, MlpSite))}
    job.record.layers.sort(key=lambda layer: order_of[layer["name"]])
    job.record.heads.sort(key=lambda layer: job.head_index[layer["name"]])
    job.record.config_updates = job.family.update_config(job.meta, job.src)
    write_kept_indices(tmp, job.record)
    dtypes = ({job.out_dtype} if job.out_dtype is not None
              else {t.dtype for t in job.ckpt.tensors.values() if t.dtype.is_floating_point})
    return write_streamed_config(
        tmp, family=job.family, meta=job.meta, src=job.src, layout=job.layout, scope=job.scope, record=job.record,
        native=native, dtypes=dtypes, params_before=job.params_before, files=files,
        extra={"weights_from": str(job.weights),
               "stream": {**job.plan.to_json(), "select_dtype": dtype_name(job.select_dtype), "layout": job.layout}})


def stream_prune(
    model: str | Source,
    weights: str | os.PathLike,
    out: str | os.PathLike,
    settings: PruneSettings | None = None,
    *,
    widths: Mapping[str, int] | Sequence[int] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    max_memory: int | str | None = None,
    workers: int | None = None,
    shard_size: int | str | None = None,
    select_device: str | torch.device | None = None,
    select_dtype: str = "float64",
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Prune the safetensors checkpoint ``weights`` of architecture ``model`` into ``out``.

    ``model`` is a spec (``timm:NAME``, ``open_clip:ARCH``, ``hf:ID_OR_DIR``) or a
    :class:`Source`; it is only built on the ``meta`` device. Widths and ``criterion`` mean
    what they mean for :func:`dgmr.prune`, and so do ``heads``/``head_fraction`` (weights-only head
    criteria: each attention layer is read, scored and cut on its own). ``max_memory`` (bytes or ``"3GB"``) bounds the
    resident set: it sizes the output shards and how many MLPs are selected at once
    (``workers``, default: by core count), and is refused up front when one MLP cannot fit.
    ``select_device`` runs the selection there (e.g. ``"cuda"``) while everything else
    stays on the CPU; ``select_dtype`` is its compute dtype (``float64`` by default, as in
    :func:`dgmr.prune`, which makes the two bit-for-bit equal; ``float32`` is faster but can
    depart from the exact greedy order where two residual norms tie to ~1e-6). Returns a
    summary dict (also the ``dgmr prune --weights`` output). ``settings`` (or its fields as
    keywords) are ``dgmr prune``'s; ``widths`` gives per-layer widths instead.
    """
    t0 = time.perf_counter()
    s = PruneSettings.from_keywords(settings, "stream_prune", **kwargs)
    if s.random_init:
        raise DgmrError("--random-init and --weights exclude each other (the weights come from --weights)")
    if s.params_fraction is not None:
        raise DgmrError("--params-fraction spends the parameters by measured error on calibration images, which "
                        "streaming prune never runs: prune in memory with --calibration DATA --allocate global")
    request = {k: v for k, v in {**s.widths(), "widths": widths}.items() if v is not None}
    heads = {k: v for k, v in s.head_counts().items() if v is not None}
    inputs = [("model", model_path(model)), *[("weights", w) for w in checkpoint_paths(weights)]]
    with claimed_output_dir(out, inputs, s.overwrite):  # one writer from the emptiness check to the rename into place
        job = plan_stream(model, weights, widths=request, criterion=s.criterion, seed=s.seed,
                          model_kwargs=model_kwargs, dtype=s.dtype, max_memory=max_memory, workers=workers,
                          shard_size=shard_size, select_device=select_device, select_dtype=select_dtype,
                          native=s.native, heads=heads)
        with PeakRss() as rss, atomic_dir(out, s.overwrite) as tmp:
            files, out_bytes = run_stream(job, tmp, progress)
            config = write_stream_config(job, tmp, files, s.native)
    return prune_summary(out, job.src.spec, job.family, s.criterion, config["widths"], job.params_before,
                         config["params_after"], config["native_export"], t0, weights=str(Path(weights)),
                         checkpoint_bytes=job.ckpt.nbytes, output_bytes=out_bytes, files=len(files),
                         weights_scope=job.scope, workers=job.plan.workers, peak_rss_bytes=rss.peak,
                         **({"heads_after": sorted(set(job.record.head_counts.values()))} if heads else {}))
