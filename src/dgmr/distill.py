"""``dgmr.distill``: label-free feature distillation that recovers a pruned model.

The teacher is the original model: frozen, eval mode, no grad, never wrapped. The student
(a pruned copy, same family) sees the same augmented batch and learns to reproduce the
teacher's final-layer features (``family.features``: pooled/CLS feature + patch tokens)
with MSE (or cosine) losses, weighted 1:1 by default. The optimiser and schedule default to
the paper's recipe: AdamW betas (0.9, 0.95), lr = base_lr x global_batch / 256, linear
warmup then cosine down to min_lr, weight decay cosine 0.04 -> 0.2, optional EMA.

One function, :func:`distill`, runs alone on a CPU or GPU or under ``torchrun`` (DDP by
default, FSDP2 ``fully_shard`` per transformer block with ``fsdp=True``). Only rank 0
writes. The run directory holds::

    run_config.json    resolved settings (what --resume continues with)
    metrics.jsonl      one JSON line per logged step
    checkpoint.pt      latest checkpoint (atomic; loaded with torch.load(weights_only=True))
    summary.json       what :func:`distill` returned
    model.safetensors + config.json (+ the library's own format)   the final student, as ``dgmr prune`` writes it
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import dist as D
from .artifact import CONFIG, INDICES, check_output_dir, read_config, save, vision_params, write_json
from .data import DataSource, EpochIndexSampler, ImageDataset, ShardImages, TrainTransform, collate, resolve_data
from .errors import DgmrError
from .families import Family, family_of
from .sources import Source, is_dgmr_dir

CHECKPOINT = "checkpoint.pt"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOSSES = ("mse", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")
# settings that may change when resuming (they do not change the trained weights)
RESUME_MUTABLE = {"workers", "log_every", "save_every", "tensorboard", "device"}


@dataclass
class DistillSettings:
    """Every training setting; defaults follow the paper's recipe (method.md section 4)."""

    epochs: float | None = None  # None and steps None: 10 epochs (the paper)
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 64  # per process
    accum: int = 1  # gradient accumulation (micro-batches per optimizer step)
    base_lr: float = 1e-4  # lr = base_lr * global_batch / 256
    lr: float | None = None  # absolute peak lr (overrides base_lr scaling)
    min_lr: float = 1e-6
    warmup_steps: int | None = None  # default: warmup_fraction of all steps
    warmup_fraction: float = 0.1  # 1 of the paper's 10 epochs
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None  # max global grad norm
    ema: float | None = None  # e.g. 0.997: export the EMA of the student
    loss: str = "mse"  # mse | cosine
    pooled_weight: float = 1.0
    tokens_weight: float = 1.0
    crop_scale: tuple[float, float] = (0.2, 1.0)
    image_size: int | None = None  # default: the teacher's
    seed: int = 0
    workers: int | None = None  # DataLoader workers (default: from the CPU count; 0 for in-memory data)
    precision: str = "auto"  # bf16 autocast on GPU, fp32 on CPU
    device: str | None = None  # cpu | cuda (default: cuda when available)
    fsdp: bool = False  # FSDP2 fully_shard per block instead of DDP (under torchrun)
    save_every: int = 1000  # checkpoint every N steps (0: only at the end)
    log_every: int = 10  # metrics line every N steps
    tensorboard: bool = True  # also log to TensorBoard when the package is installed
    random_init: bool = False  # build teacher/student *specs* with random weights (tests, no download)
    model_kwargs: dict[str, Any] | None = None  # architecture kwargs for teacher/student specs

    @classmethod
    def resolve(cls, config: str | os.PathLike | dict[str, Any] | None = None, **overrides: Any) -> "DistillSettings":
        """Defaults <- config file (YAML/JSON) or dict <- ``overrides`` (None values ignored)."""
        values: dict[str, Any] = {}
        if config is not None:
            values.update(_read_config_file(config) if not isinstance(config, dict) else config)
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise DgmrError(f"unknown distill setting {unknown[0]!r}; known: {', '.join(sorted(names))}")
        for key in ("betas", "crop_scale"):
            if key in values and values[key] is not None:
                values[key] = tuple(float(v) for v in values[key])
        s = cls(**values)
        s.validate()
        return s

    def validate(self) -> None:
        def positive(name: str, v: Any) -> None:
            if v is not None and not v > 0:
                raise DgmrError(f"{name} must be > 0, got {v}")

        for name in ("epochs", "steps", "batch_size", "accum", "base_lr", "lr", "clip_grad", "image_size"):
            positive(name, getattr(self, name))
        for name in ("min_lr", "weight_decay", "weight_decay_end", "pooled_weight", "tokens_weight", "save_every"):
            if getattr(self, name) < 0:
                raise DgmrError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise DgmrError(f"log_every must be >= 1, got {self.log_every}")
        if self.pooled_weight == 0 and self.tokens_weight == 0:
            raise DgmrError("pooled_weight and tokens_weight are both 0: nothing to learn")
        if self.loss not in LOSSES:
            raise DgmrError(f"unknown loss {self.loss!r}; choose {' or '.join(LOSSES)}")
        if self.precision not in PRECISIONS:
            raise DgmrError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise DgmrError(f"ema must be in (0, 1), got {self.ema}")
        if not 0 <= self.warmup_fraction < 1:
            raise DgmrError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise DgmrError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.workers is not None and self.workers < 0:
            raise DgmrError(f"workers must be >= 0, got {self.workers}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DgmrError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            value = yaml.safe_load(text)
        else:
            value = json.loads(text)
    except Exception as e:  # yaml.YAMLError / ValueError: the file is the user's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DgmrError(f"config file {path} does not parse: {first}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DgmrError(f"config file {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


# ---------------------------------------------------------------------------------------
# loss and schedules


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], kind: str = "mse",
                 pooled_weight: float = 1.0, tokens_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, pooled, tokens) losses between two ``family.features`` dicts, in float32.

    ``mse``: mean squared error; ``cosine``: mean of 1 - cosine similarity per feature vector."""

    def one(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = s.float(), t.float()
        if kind == "cosine":
            return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        return F.mse_loss(s, t)

    lp = one(student["pooled"], teacher["pooled"])
    lt = one(student["tokens"], teacher["tokens"])
    return pooled_weight * lp + tokens_weight * lt, lp.detach(), lt.detach()


def lr_at(step: int, total: int, peak: float, min_lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` down to ``min_lr``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def wd_at(step: int, total: int, start: float, end: float) -> float:
    """Weight decay following a cosine from ``start`` (step 0) to ``end`` (last step)."""
    t = step / max(1, total - 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, t)))


# ---------------------------------------------------------------------------------------
# models


class FeatureNet(nn.Module):
    """``family.features`` as a module, so DDP/FSDP see the call that computes the loss."""

    def __init__(self, model: nn.Module, family: Family):
        super().__init__()
        self.model, self.family = model, family

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.family.features(self.model, x)


def _open(model: nn.Module | str | os.PathLike, role: str, settings: DistillSettings) -> tuple[nn.Module, Source | None, dict | None]:
    """(module, source, dgmr config or None) for a spec, a dgmr directory or a module."""
    if isinstance(model, nn.Module):
        return model, None, None
    from .pipeline import open_model

    if os.path.isdir(str(model)) and not is_dgmr_dir(model):
        raise DgmrError(f"{role} {model} is not a dgmr model directory (use hf:{model} for a Hugging Face directory)")
    cfg = read_config(model) if is_dgmr_dir(model) else None
    net, src = open_model(model, random_init=settings.random_init, model_kwargs=settings.model_kwargs)
    return net, src, cfg


def check_pair(teacher: nn.Module, student: nn.Module) -> Family:
    """The shared family of teacher and student; rejects pairs distillation cannot match."""
    ft, fs = family_of(teacher), family_of(student)
    if ft.name != fs.name:
        raise DgmrError(f"teacher is a {ft.name} model but student is a {fs.name} model: distill within one family")
    if type(teacher) is not type(student):
        raise DgmrError(f"teacher is a {type(teacher).__name__} but student is a {type(student).__name__}")
    t_sites = {s.name: s for s in ft.mlps(teacher)}
    s_sites = {s.name: s for s in fs.mlps(student)}
    if set(t_sites) != set(s_sites):
        raise DgmrError(f"teacher and student have different MLP layouts ({len(t_sites)} vs {len(s_sites)} MLPs)")
    for name, s in s_sites.items():
        t = t_sites[name]
        if s.in_features != t.in_features:
            raise DgmrError(f"{name}: student width {s.in_features} differs from the teacher's {t.in_features}")
        if s.hidden > t.hidden:
            raise DgmrError(f"student is wider than the teacher at {name} ({s.hidden} > {t.hidden} hidden neurons): "
                            "did you swap --teacher and --student?")
    return ft


def _block_modules(model: nn.Module, family: Family) -> list[nn.Module]:
    """The transformer blocks (the modules that hold each MLP): FSDP's sharding units."""
    blocks = []
    for site in family.mlps(model):
        parent = site.name.rsplit(".", 1)[0] if "." in site.name else ""
        m = model.get_submodule(parent) if parent else site.module
        if all(m is not b for b in blocks):
            blocks.append(m)
    return blocks


# ---------------------------------------------------------------------------------------
# data loading


@dataclass
class _Loader:
    source: DataSource
    transform: TrainTransform
    info: D.DistInfo
    settings: DistillSettings
    workers: int
    pin: bool
    batches_per_epoch: int = field(init=False)  # per rank, micro-batches

    def __post_init__(self) -> None:
        s, world = self.settings, self.info.world
        n = self.source.num_samples
        if n is None:
            self.batches_per_epoch = 0  # unknown: streaming shards with --steps
            return
        per_rank = n // world
        self.batches_per_epoch = per_rank // s.batch_size
        if self.batches_per_epoch < s.accum:
            raise DgmrError(f"{self.source.description}: {n} images are fewer than one global batch "
                            f"({s.batch_size} x {world} process(es) x {s.accum} accumulation): lower --batch-size")

    def batches(self, start_micro: int, steps_per_epoch: int) -> Iterator[tuple[int, torch.Tensor | None, list[str]]]:
        """Endless (epoch, images, unreadable names) micro-batches from micro-batch ``start_micro``."""
        from torch.utils.data import DataLoader, DistributedSampler

        s, info = self.settings, self.info
        common = dict(batch_size=s.batch_size, collate_fn=collate, num_workers=self.workers, pin_memory=self.pin,
                      drop_last=True)
        if self.source.kind == "shards":
            ds = ShardImages(self.source.items, self.transform, seed=s.seed, rank=info.rank, world=info.world,
                             batch_size=s.batch_size, skip_batches=start_micro)
            micro = start_micro
            for x, bad in DataLoader(ds, **common):
                yield (micro // (steps_per_epoch * s.accum) if steps_per_epoch else 0), x, bad
                micro += 1
            raise DgmrError(f"no readable images in {self.source.description}")
        ds = ImageDataset(self.source.items, self.transform, seed=s.seed,
                          name="images" if self.source.kind == "memory" else "files")
        per_epoch = steps_per_epoch * s.accum  # micro-batches used per epoch
        epoch, skip = divmod(start_micro, per_epoch)
        while True:
            sampler = DistributedSampler(ds, num_replicas=info.world, rank=info.rank, shuffle=True, seed=s.seed,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            loader = DataLoader(ds, sampler=EpochIndexSampler(sampler, epoch, skip * s.batch_size), **common)
            used, readable = skip, 0
            for x, bad in loader:
                if used >= per_epoch:
                    break
                readable += 0 if x is None else x.shape[0]
                yield epoch, x, bad
                used += 1
            if readable == 0 and skip == 0:
                raise DgmrError(f"no readable images in {self.source.description}")
            epoch, skip = epoch + 1, 0


def _default_workers(source: DataSource, info: D.DistInfo) -> int:
    if source.kind == "memory":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // info.world - 1))


# ---------------------------------------------------------------------------------------
# checkpoints


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's latest checkpoint (tensors and plain values only: nothing is unpickled)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise DgmrError(f"nothing to resume: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated/corrupt file, or one holding objects we refuse to unpickle
        raise DgmrError(f"cannot read checkpoint {path}: {str(e).strip().splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "dgmr-distill-checkpoint":
        raise DgmrError(f"{path} is not a dgmr distill checkpoint")
    return ckpt


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines a killed run wrote after its last checkpoint."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except ValueError:
            continue  # a line cut short by the kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _fingerprint(model: nn.Module) -> list[float]:
    """Sums of the full parameters (identical across ranks iff training stayed in sync)."""
    total, total_abs, weighted = 0.0, 0.0, 0.0
    for i, p in enumerate(model.parameters()):
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        t = t.detach().double()
        total += float(t.sum())
        total_abs += float(t.abs().sum())
        weighted += float(t.sum()) * (i + 1)
    return [total, total_abs, weighted]


def _export(student: nn.Module, out: Path, src: Source | None, student_cfg: dict | None, dtype: torch.dtype,
            distill_info: dict[str, Any], student_dir: Path | None) -> dict[str, Any]:
    """Write the student into ``out`` as ``dgmr prune`` does (config.json written last)."""
    student = student.to(dtype)
    family = family_of(student)
    extra: dict[str, Any] = {"distill": distill_info, "params_after": vision_params(student, family)}
    if student_cfg is not None:
        for key in ("prune", "params_before", "random_init"):
            if key in student_cfg:
                extra[key] = student_cfg[key]
    tmp = out / f".export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    config = save(student, tmp, source=src, record=None, extra=extra)
    if student_dir is not None and (student_dir / INDICES).is_file():
        shutil.copy2(student_dir / INDICES, tmp / INDICES)
    names = sorted(p.name for p in tmp.iterdir() if p.name != CONFIG) + [CONFIG]
    for name in names:
        dst = out / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(tmp / name, dst)
    tmp.rmdir()
    return config


# ---------------------------------------------------------------------------------------
# the training run


def distill(
    teacher: nn.Module | str | os.PathLike | None,
    student: nn.Module | str | os.PathLike | None,
    data: Any,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    student_source: Source | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Distill ``teacher`` into ``student`` on unlabeled images; write the run into ``out``.

    ``teacher``/``student``: model specs (``timm:NAME`` ...), dgmr directories, or built
    ``nn.Module`` s (a student module is trained in place). ``data``: a directory of images,
    a text file of image paths, WebDataset shards, a list of PIL images/paths/image
    tensors, or a torch Dataset of (3, H, W) image tensors in [0, 1]. ``settings``: the
    fields of :class:`DistillSettings` (they override ``config``, a YAML/JSON file or dict).
    ``resume``: continue the run in ``out`` from its checkpoint, with its saved settings
    (teacher/student/data may then be None when they were given as paths).
    ``on_step(info)`` is called on every rank after every optimizer step.

    Returns a JSON-able summary (also written to ``out/summary.json``).
    """
    t_start = time.perf_counter()
    out = Path(out)
    device = settings.get("device")
    if device is None and config is not None and not resume:
        device = DistillSettings.resolve(config, **settings).device
    info = D.init(device)
    # modules passed in come back as they were (grad flags, train/eval mode; the teacher also dtype
    # and device), except for the student's trained weights
    states = [_module_state(m, full=m is teacher) for m in (teacher, student) if isinstance(m, nn.Module)]
    try:
        return _run(teacher, student, data, out, config, resume, overwrite, progress, on_step, student_source,
                    settings, info, t_start)
    finally:
        for state in states:
            _restore_module_state(*state)
        D.cleanup(info)


def _module_state(model: nn.Module, full: bool) -> tuple[nn.Module, list, list, tuple | None]:
    p = next(model.parameters(), None)
    where = (p.device, p.dtype) if full and p is not None else None
    return (model, [(m, m.training) for m in model.modules()], [(q, q.requires_grad) for q in model.parameters()], where)


def _restore_module_state(model: nn.Module, modes: list, grads: list, where: tuple | None) -> None:
    for m, training in modes:
        m.training = training
    for q, requires_grad in grads:
        q.requires_grad_(requires_grad)
    if where is not None:
        model.to(device=where[0], dtype=where[1])


def _prepare_out(out: Path, resume: bool, overwrite: bool, info: D.DistInfo, create: bool) -> str | None:
    """Rank 0 checks (and with ``create``, makes) the run directory; every rank gets the same verdict."""
    err = None
    if info.is_main:
        try:
            if resume:
                if not (out / CHECKPOINT).is_file():
                    raise DgmrError(f"nothing to resume: {out / CHECKPOINT} does not exist")
            else:
                check_output_dir(out, overwrite)
                if create:
                    if out.is_dir():
                        shutil.rmtree(out)
                    out.mkdir(parents=True)
        except DgmrError as e:
            err = str(e)
        except OSError as e:
            err = f"cannot create the run directory {out}: {e.strerror or e}"
    return D.broadcast_object(err, info)


def _run(teacher, student, data, out: Path, config, resume, overwrite, progress, on_step, student_source,
         overrides: dict[str, Any], info: D.DistInfo, t_start: float) -> dict[str, Any]:
    err = _prepare_out(out, resume, overwrite, info, create=False)  # fail before any expensive work
    if err:
        raise DgmrError(err)
    saved: dict[str, Any] | None = None
    if resume:
        saved = json.loads((out / RUN_CONFIG).read_text())
        s = DistillSettings.resolve(saved["settings"])
        new = DistillSettings.resolve(config, **overrides)
        explicit = {k for k, v in overrides.items() if v is not None} | (set(_read_config_file(config)) if isinstance(config, (str, os.PathLike)) else set(config or {}))
        for key in sorted(explicit - RESUME_MUTABLE):
            if getattr(new, key) != getattr(s, key):
                raise DgmrError(f"--resume continues with the run's saved settings; {key} was "
                                f"{getattr(s, key)!r}, now {getattr(new, key)!r}")
        for key in explicit & RESUME_MUTABLE:
            setattr(s, key, getattr(new, key))
        teacher = teacher if teacher is not None else saved.get("teacher")
        student = student if student is not None else saved.get("student")
        data = data if data is not None else saved.get("data")
        if teacher is None or student is None or data is None:
            raise DgmrError("this run was started with in-memory models or data: pass them again to resume")
    else:
        s = DistillSettings.resolve(config, **overrides)
    if teacher is None or student is None or data is None:
        raise DgmrError("distill needs a teacher, a student and data")

    source = resolve_data(data)  # cheap checks first: a bad --data fails before any model is loaded

    # -- models ---------------------------------------------------------------------------
    t_model, t_src, _ = _open(teacher, "teacher", s)
    s_model, s_src, s_cfg = _open(student, "student", s)
    if t_model is s_model:
        raise DgmrError("teacher and student are the same module object: pass a pruned copy as the student")
    s_src = s_src or student_source
    student_dir = Path(student) if isinstance(student, (str, os.PathLike)) and s_cfg is not None else None
    family = check_pair(t_model, s_model)
    export_dtype = next(s_model.parameters()).dtype
    dcfg = family.data_config(t_model)
    image_size = s.image_size or dcfg["image_size"]

    device = info.device
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if (s.precision == "bf16" or (s.precision == "auto" and cuda)) else None
    t_model.requires_grad_(False).eval().to(device=device, dtype=amp_dtype if cuda and amp_dtype else None)
    s_model.float().to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    # probe: feature shapes must match, and only parameters that get a gradient are trained
    vision = family.vision_root(s_model)[1]
    s_model.requires_grad_(False)
    vision.requires_grad_(True)
    s_model.train()
    torch.manual_seed(s.seed)
    x = torch.randn(2, 3, image_size, image_size, device=device)
    try:
        with torch.no_grad(), autocast():
            tf = family.features(t_model, x)
        with autocast():
            sf = family.features(s_model, x)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise DgmrError(f"the models do not run at {image_size}px: {str(e).strip().splitlines()[0]}") from e
    for key in ("pooled", "tokens"):
        if tuple(tf[key].shape) != tuple(sf[key].shape):
            raise DgmrError(f"teacher and student {key} features differ in shape: {tuple(tf[key].shape)} vs "
                            f"{tuple(sf[key].shape)}")
    feature_loss(sf, tf)[0].backward()
    named = [(n, p) for n, p in s_model.named_parameters() if p.requires_grad]
    for n, p in named:
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise DgmrError("no student parameter influences the distillation features")
    del x, tf, sf

    # -- data -------------------------------------------------------------------------------
    transform = TrainTransform(image_size, dcfg["mean"], dcfg["std"], scale=s.crop_scale)
    workers = s.workers if s.workers is not None else _default_workers(source, info)
    if resume and s.workers is None and saved and saved.get("workers") is not None:
        workers = int(saved["workers"])  # as the run started
    if resume and source.kind == "shards" and saved and saved.get("workers") not in (None, workers):
        # each DataLoader worker streams its own share of the shards: the order depends on their number
        raise DgmrError(f"resume a shard run with the same number of DataLoader workers: --workers {saved['workers']}")
    loader = _Loader(source, transform, info, s, workers, pin=cuda)
    steps_per_epoch = loader.batches_per_epoch // s.accum
    if s.steps is not None:
        total = int(s.steps)
    elif steps_per_epoch:
        total = max(1, int(round((s.epochs if s.epochs is not None else 10) * steps_per_epoch)))
    else:
        raise DgmrError("the number of images in these shards is unknown: give --steps")
    global_batch = s.batch_size * info.world * s.accum
    peak_lr = s.lr if s.lr is not None else s.base_lr * global_batch / 256
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_fraction * total)

    # -- wrap + optimizer -------------------------------------------------------------------------
    net: nn.Module = FeatureNet(s_model, family)
    shell = None
    if info.distributed and s.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if info.is_main:  # for the export: the architecture without a second copy of the weights
            shell = copy.deepcopy(s_model).to("meta")

        mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype and cuda else MixedPrecisionPolicy()
        for block in _block_modules(s_model, family):
            fully_shard(block, mp_policy=mp)
        fully_shard(net, mp_policy=mp)
        trainable = [(n, p) for n, p in s_model.named_parameters() if p.requires_grad]
    elif info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if cuda else None)
    decay = [p for n, p in trainable if p.ndim > 1 and not n.endswith(("cls_token", "pos_embed", "reg_token",
                                                                         "class_embedding", "positional_embedding"))]
    ids = {id(p) for p in decay}
    no_decay = [p for _, p in trainable if id(p) not in ids]
    groups = [{"params": decay, "wd_scale": 1.0}, {"params": no_decay, "wd_scale": 0.0}]
    optim = torch.optim.AdamW([g for g in groups if g["params"]], lr=peak_lr, betas=s.betas,
                              weight_decay=s.weight_decay, fused=True if cuda else None)
    ema = {n: p.detach().clone() for n, p in trainable} if s.ema else None

    step, images_seen, unreadable = 0, 0, set()
    if resume:
        ckpt = load_checkpoint(out)
        step, images_seen, unreadable = int(ckpt["step"]), int(ckpt["images_seen"]), set(ckpt["unreadable"])
        if s.fsdp and info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(s_model, optim, model_state_dict=ckpt["student"], optim_state_dict=ckpt["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            s_model.load_state_dict(ckpt["student"])
            optim.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            with torch.no_grad():
                for n, t in ema.items():
                    if hasattr(t, "to_local"):
                        t.to_local().copy_(_shard_like(ckpt["ema"][n], t))
                    else:
                        t.copy_(ckpt["ema"][n])
        rng = ckpt["rng"]
        torch.set_rng_state(rng[info.rank] if info.rank < len(rng) else rng[0])
        if cuda and ckpt.get("cuda_rng"):
            torch.cuda.set_rng_state(ckpt["cuda_rng"][min(info.rank, len(ckpt["cuda_rng"]) - 1)])
        del ckpt
    else:
        torch.manual_seed(s.seed + info.rank)

    # -- logging --------------------------------------------------------------------------------
    if not resume:  # everything checked: only now does the run directory appear
        err = _prepare_out(out, resume, overwrite, info, create=True)
        if err:
            raise DgmrError(err)
    metrics_path = out / METRICS
    writer = None
    if info.is_main:
        if resume:
            _truncate_metrics(metrics_path, step)
        else:
            write_json(out / RUN_CONFIG, {
                "teacher": str(teacher) if not isinstance(teacher, nn.Module) else None,
                "student": str(student) if not isinstance(student, nn.Module) else None,
                "data": str(data) if isinstance(data, (str, os.PathLike)) else None,
                "settings": s.to_json(), "world_size": info.world, "global_batch": global_batch,
                "peak_lr": peak_lr, "warmup_steps": warmup, "total_steps": total,
                "steps_per_epoch": steps_per_epoch, "image_size": image_size, "mean": dcfg["mean"],
                "std": dcfg["std"], "family": family.name, "data_description": source.description,
                "workers": workers, "precision": "bf16" if amp_dtype else "fp32"})
        if s.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)
            except ImportError:
                writer = None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc="distill", unit="step", disable=not (progress and info.is_main),
               dynamic_ncols=True)

    def save_checkpoint(epoch: int) -> None:
        local_bad = any(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in params)
        if D.all_reduce_sum(torch.tensor([float(local_bad)], device=device), info).item() > 0:
            raise DgmrError(f"the student's weights are not finite after step {step}: stopped; the last good "
                            f"checkpoint is {out / CHECKPOINT}; try a lower --lr or --clip-grad")
        if s.fsdp and info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            msd, osd = get_state_dict(s_model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            msd, osd = s_model.state_dict(), optim.state_dict()
        ema_sd = None
        if ema is not None:
            ema_sd = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu() for n, t in ema.items()}
        rngs = D.all_gather_objects(torch.get_rng_state(), info)
        cuda_rngs = D.all_gather_objects(torch.cuda.get_rng_state(), info) if cuda else None
        bad = D.all_gather_objects(sorted(unreadable), info)
        if info.is_main:
            _atomic_torch_save({"format": "dgmr-distill-checkpoint", "step": step, "epoch": epoch,
                                "images_seen": images_seen, "unreadable": sorted(set().union(*map(set, bad))),
                                "student": msd, "optimizer": osd, "ema": ema_sd, "rng": rngs, "cuda_rng": cuda_rngs,
                                "world_size": info.world}, out / CHECKPOINT)
        D.barrier(info)

    # -- the loop ---------------------------------------------------------------------------------
    params = [p for _, p in trainable]
    if resume and info.is_main and metrics_path.is_file():
        first_rows = metrics_path.read_text().splitlines()[:1]
        first_loss = json.loads(first_rows[0])["loss"] if first_rows else None
    else:
        first_loss = None
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, pooled, tokens, images (since last log)
    last_log_t, last_loss = time.perf_counter(), None
    batches = loader.batches(step * s.accum, steps_per_epoch)
    epoch = step // steps_per_epoch if steps_per_epoch else 0
    is_ddp = info.distributed and not s.fsdp
    while step < total:
        for micro in range(s.accum):
            epoch, x, bad = next(batches)
            unreadable.update(bad)
            weight = 1.0
            if x is None:  # every image of this micro-batch was unreadable: keep ranks in step, learn nothing
                x, weight = torch.zeros(1, 3, image_size, image_size), 0.0
            x = x.to(device, non_blocking=True)
            with torch.no_grad(), autocast():
                tf = family.features(t_model, x)
            last = micro == s.accum - 1
            sync = contextlib.nullcontext() if last or not is_ddp else net.no_sync()
            if s.fsdp and info.distributed:
                net.set_requires_gradient_sync(last)
            with sync:
                with autocast():
                    sf = net(x)
                loss, lp, lt = feature_loss(sf, tf, s.loss, s.pooled_weight, s.tokens_weight)
                (loss * (weight / s.accum)).backward()
            n = x.shape[0] * int(weight)
            sums[:3] += torch.stack([loss.detach(), lp, lt]).double() * n  # no host sync: summed on device
            sums[3] += n
        lr, wd = lr_at(step, total, peak_lr, s.min_lr, warmup), wd_at(step, total, s.weight_decay, s.weight_decay_end)
        for g in optim.param_groups:
            g["lr"], g["weight_decay"] = lr, wd * g["wd_scale"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.clip_grad) if s.clip_grad else None
        optim.step()
        optim.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.values()), params, 1 - s.ema)
        step += 1
        bar.update(1)
        checkpoint_now = step == total or (s.save_every and step % s.save_every == 0)
        row = None
        if step % s.log_every == 0 or checkpoint_now:
            tot = D.all_reduce_sum(sums.clone(), info).tolist()
            now = time.perf_counter()
            imgs = tot[3]
            images_seen += int(imgs)
            if not all(math.isfinite(v) for v in tot[:3]):
                raise DgmrError(f"the loss is not finite at step {step} (lr {lr:.3g}): stopped; the last good "
                                f"checkpoint is {out / CHECKPOINT}" + (" (none yet)" if not (out / CHECKPOINT).is_file() else "")
                                + "; try a lower --lr or --clip-grad")
            row = {"step": step, "epoch": epoch, "loss": tot[0] / max(imgs, 1), "loss_pooled": tot[1] / max(imgs, 1),
                   "loss_tokens": tot[2] / max(imgs, 1), "lr": lr, "weight_decay": wd,
                   "images_per_s": imgs / max(now - last_log_t, 1e-9), "images": images_seen,
                   "time": round(time.time(), 3)}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            first_loss = row["loss"] if first_loss is None else first_loss
            last_loss = row["loss"]
            sums.zero_()
            last_log_t = now
            if info.is_main:
                _append_jsonl(metrics_path, row)
                if writer is not None:
                    for k in ("loss", "loss_pooled", "loss_tokens", "lr", "images_per_s"):
                        writer.add_scalar(f"distill/{k}", row[k], step)
                bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.2e}", img_s=f"{row['images_per_s']:.1f}")
        if checkpoint_now:
            save_checkpoint(epoch)
        if on_step is not None:
            on_step({"step": step, "total_steps": total, "epoch": epoch, "metrics": row})
    bar.close()
    if writer is not None:
        writer.close()

    # -- end: ranks in sync, export ------------------------------------------------------------
    if ema is not None:
        with torch.no_grad():
            for (_, p), t in zip(trainable, ema.values()):
                p.copy_(t)
    prints = D.all_gather_objects(_fingerprint(s_model), info)
    ranks_identical = all(p == prints[0] for p in prints)
    bad_all = sorted(set().union(*map(set, D.all_gather_objects(sorted(unreadable), info))))
    if s.fsdp and info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(s_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seconds = time.perf_counter() - t_start
    summary = {
        "out": str(out), "teacher": str(teacher) if not isinstance(teacher, nn.Module) else type(teacher).__name__,
        "student": str(student) if not isinstance(student, nn.Module) else type(student).__name__,
        "family": family.name, "steps": step, "epochs": round(step / steps_per_epoch, 3) if steps_per_epoch else None,
        "global_batch": global_batch, "peak_lr": peak_lr, "first_loss": first_loss, "final_loss": last_loss,
        "images_seen": images_seen, "unreadable_images": len(bad_all), "unreadable_examples": bad_all[:5],
        "ignored_files": source.ignored_files, "world_size": info.world, "ranks_identical": ranks_identical,
        "resumed": bool(resume), "ema": s.ema, "seconds": round(seconds, 2),
        "images_per_s": round(images_seen / seconds, 2) if seconds > 0 and not resume else None,
    }
    if not ranks_identical:
        raise DgmrError(f"student weights differ across ranks after training: {prints}")
    if info.is_main:
        export_model = s_model
        if s.fsdp and info.distributed:
            export_model = _unsharded_copy(shell, full)
        export_model = export_model.cpu()
        cfg = _export(export_model, out, s_src, s_cfg, export_dtype,
                      {k: summary[k] for k in ("teacher", "steps", "final_loss", "images_seen", "global_batch", "ema")},
                      student_dir)
        summary["export"] = cfg["native_export"].get("load", cfg["native_export"].get("skipped"))
        write_json(out / SUMMARY, summary)
    D.barrier(info)
    if isinstance(student, nn.Module):
        s_model.to(export_dtype)
    return summary


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The local shard of ``full`` laid out as the DTensor ``like`` (a collective: all ranks call it)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements).to_local()


def _unsharded_copy(shell: nn.Module, full_state: dict[str, torch.Tensor]) -> nn.Module:
    """``shell`` (a meta-device copy taken before sharding) filled with the gathered full weights."""
    shell = shell.to_empty(device="cpu")
    shell.load_state_dict(full_state, strict=True)
    return shell
