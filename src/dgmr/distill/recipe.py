"""The distillation recipe: label-free feature distillation that recovers a pruned model.

The method is docs/method.md, "Distillation recipe". The teacher is the original model:
frozen, eval mode, no grad, never wrapped. The student (a pruned copy, same family) sees the
same augmented batch and learns to reproduce the teacher's final-layer features
(``family.features``: pooled/CLS feature + patch tokens) with MSE (or cosine) losses, weighted
1:1 by default. The optimiser and schedule default to the paper's recipe: AdamW betas
(0.9, 0.95), lr = base_lr x global_batch / 256, linear warmup then cosine down to min_lr,
weight decay cosine 0.04 -> 0.2, optional EMA.

:func:`distill` is the entry point; it builds a :class:`DistillRecipe` and runs its phases
(:meth:`DistillRecipe.run` lists them in order). It runs alone on a CPU or GPU or under
``torchrun`` (DDP by default, FSDP2 ``fully_shard`` per transformer block with
``fsdp=True``). Only rank 0 writes. The run directory (files written by :mod:`.checkpoint`)
holds::

    run_config.json    resolved settings (what --resume continues with)
    metrics.jsonl      one JSON line per logged step
    checkpoint.pt      latest checkpoint (atomic; loaded with torch.load(weights_only=True))
    summary.json       what :func:`distill` returned
    model.safetensors + config.json (+ the library's own format)   the final student, as ``dgmr prune`` writes it
"""
from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import dist as D
from ..errors import DgmrError, Preempted, first_line
from ..models.artifact import check_output_dir, write_json
from ..models.families import Family, family_of
from ..models.open import open_model_with_config
from ..models.sources import Source, is_dgmr_dir
from ..paths import data_paths, model_path, output_lock, refuse_overlap, remove_stale_temps
from .. import schema
from .checkpoint import (CHECKPOINT, METRICS, RUN_CONFIG, SUMMARY, append_jsonl, atomic_torch_save, checkpoint_dict,
                         export_student, first_logged_loss, last_logged_loss, load_checkpoint, truncate_metrics)
from ..images import printable
from .data import DataSource, Loader, TrainTransform, default_workers, resolve_data
from .losses import feature_loss, lr_at, wd_at
from .settings import DEFAULT_EPOCHS, RESUME_MUTABLE, DistillSettings, read_config_file

__all__ = ["CHECKPOINT", "METRICS", "RUN_CONFIG", "SUMMARY", "DistillRecipe", "TrainState", "check_pair", "distill",
           "load_checkpoint", "resume_settings"]

# parameters AdamW does not decay besides biases and norms (ndim < 2): tokens and position embeddings
NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "reg_token", "class_embedding", "positional_embedding")

# ---------------------------------------------------------------------------------------
# models


class FeatureNet(nn.Module):
    """``family.features`` as a module, so DDP/FSDP see the call that computes the loss."""

    def __init__(self, model: nn.Module, family: Family):
        super().__init__()
        self.model, self.family = model, family

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.family.features(self.model, x)


def _to_cpu(obj: Any) -> Any:
    """A CPU copy of every tensor in a nested checkpoint dict (a snapshot training cannot change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class _BackgroundWriter:
    """Writes checkpoints in a thread so the GPU does not wait on the disk; one write at a
    time (a new one first waits for the last), errors surface at the next :meth:`wait`."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def write(self, obj: Any, path: Path) -> None:
        self.wait()

        def run() -> None:
            try:
                atomic_torch_save(obj, path)
            except BaseException as e:  # reported by wait(), in the training thread
                self.error = e

        self.thread = threading.Thread(target=run, name="dgmr-checkpoint", daemon=False)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            e, self.error = self.error, None
            if isinstance(e, DgmrError):
                raise e
            raise DgmrError(f"writing the checkpoint failed: {first_line(e)}") from e


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """``torch.nn.attention.sdpa_kernel`` with backend ``name`` tried first ("auto": no change)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    rest = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH) if b != first]
    return sdpa_kernel([first, *rest], set_priority=True)


def _open(model: nn.Module | str | os.PathLike, role: str, settings: DistillSettings) -> tuple[nn.Module, Source | None, dict | None]:
    """(module, source, dgmr config or None) for a spec, a dgmr directory or a module."""
    if isinstance(model, nn.Module):
        return model, None, None
    # --random-init weights come from the seed (teacher and student apart): a resumed run
    # rebuilds the very teacher it trained against; the global RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + (0 if role == "teacher" else 1))
        return open_model_with_config(model, random_init=settings.random_init, model_kwargs=settings.model_kwargs,
                                      role=role)


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


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The local shard of ``full`` laid out as the DTensor ``like`` (a collective: all ranks call it)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements).to_local()


def _unsharded_copy(shell: nn.Module, full_state: dict[str, torch.Tensor]) -> nn.Module:
    """``shell`` (a meta-device copy taken before sharding) filled with the gathered full weights."""
    shell = shell.to_empty(device="cpu")
    shell.load_state_dict(full_state, strict=True)
    return shell


# ---------------------------------------------------------------------------------------
# settings


def resume_settings(saved: dict[str, Any], config: str | os.PathLike | dict[str, Any] | None,
                    overrides: dict[str, Any]) -> DistillSettings:
    """The settings a resumed run continues with.

    ``saved`` is the run's ``run_config.json`` "settings"; ``config``/``overrides`` are what
    the resuming call gives. A resumed run keeps its saved settings so that it trains what the
    uninterrupted run would have: only :data:`RESUME_MUTABLE` settings (they do not change
    the trained weights) may be changed; naming any other with a different value is an error.
    No state is read or written besides the ``config`` file when one is given as a path.
    """
    s = DistillSettings.resolve(saved)
    new = DistillSettings.resolve(config, **overrides)
    if isinstance(config, (str, os.PathLike)):
        from_config = set(read_config_file(config))
    else:
        from_config = set(config or {})
    explicit = {k for k, v in overrides.items() if v is not None} | from_config
    for key in sorted(explicit - RESUME_MUTABLE):
        if getattr(new, key) != getattr(s, key):
            raise DgmrError(f"--resume continues with the run's saved settings; {key} was "
                            f"{getattr(s, key)!r}, now {getattr(new, key)!r}")
    for key in explicit & RESUME_MUTABLE:
        setattr(s, key, getattr(new, key))
    return s


# ---------------------------------------------------------------------------------------
# the recipe


@dataclass
class TrainState:
    """What changes as training runs; a checkpoint restores step, images_seen, unreadable, the EMA
    (and the RNGs), so a resumed run continues bit for bit."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # of the latest micro-batch
    images_seen: int = 0  # all ranks, counted at each log
    unreadable: set[str] = field(default_factory=set)  # this rank's unreadable images
    unreadable_reads: int = 0  # all ranks, counted at each log: failed reads (an image may fail in every epoch)
    ema: dict[str, torch.Tensor] | None = None  # name -> EMA of a trainable parameter (DTensors under FSDP)
    first_loss: float | None = None
    last_loss: float | None = None
    # since the last log, on the device so a step needs no host sync: loss, pooled, tokens sums and images
    sums: torch.Tensor | None = None
    last_log_t: float = 0.0


class DistillRecipe:
    """One distillation run in named phases (torchtune's recipe shape); :meth:`run` calls them in order.

    Each ``setup_*`` phase owns the attributes it sets: :meth:`resolve_settings` ``settings``
    (and ``saved``, the run_config of a resumed run); :meth:`setup_models` the models, their
    family, device and precision, and ``trainable`` (the probe's verdict); :meth:`setup_data`
    the loader and the run's numbers (``total`` steps, ``peak_lr`` ...); :meth:`wrap` ``net``
    (the student's feature call, inside DDP/FSDP); :meth:`setup_optimizer` ``optim`` and the
    EMA; :meth:`setup_logging` the metrics file, TensorBoard writer and progress bar. What
    changes while training is in ``state`` (a :class:`TrainState`).
    """

    settings: DistillSettings
    saved: dict[str, Any] | None
    source: DataSource
    t_model: nn.Module
    s_model: nn.Module
    family: Family
    trainable: list[tuple[str, nn.Parameter]]
    params: list[nn.Parameter]
    net: nn.Module
    shell: nn.Module | None  # FSDP, rank 0: the student's architecture on the meta device, for the export
    optim: torch.optim.Optimizer
    loader: Loader
    total: int
    steps_per_epoch: int

    def __init__(self, teacher: nn.Module | str | os.PathLike | None, student: nn.Module | str | os.PathLike | None,
                 data: Any, out: Path, *, info: D.DistInfo, config: str | os.PathLike | dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, on_step: Callable[[dict[str, Any]], None] | None = None,
                 student_source: Source | None = None, t_start: float | None = None):
        self.teacher, self.student, self.data, self.out = teacher, student, data, Path(out)
        self.info, self.config, self.overrides = info, config, dict(overrides or {})
        self.resume, self.overwrite, self.progress = resume, overwrite, progress
        self.on_step, self.student_source = on_step, student_source
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.saved = None
        self.lock = contextlib.ExitStack()  # rank 0: output_lock of the run directory
        self.state = TrainState()
        self.ckpt_writer = _BackgroundWriter()

    @property
    def sharded(self) -> bool:
        """FSDP2 (``fsdp`` alone, without torchrun, trains unwrapped)."""
        return self.settings.fsdp and self.info.distributed

    @property
    def ddp(self) -> bool:
        return self.info.distributed and not self.settings.fsdp

    def run(self) -> dict[str, Any]:
        """All phases. Every check runs before the run directory is created, so a failed start
        leaves nothing behind; the RNG is seeded per rank (or restored) only once all setup
        that draws from it (the probe) is done."""
        with self.lock:  # rank 0's hold on the run directory (taken by check_run_dir), released however run ends
            self.check_run_dir(create=False)  # fail before any expensive work
            self.resolve_settings()
            self.source = resolve_data(self.data)  # cheap checks first: a bad --data fails before any model is loaded
            self.setup_models()
            self.setup_data()
            self.wrap()
            self.setup_optimizer()
            if self.resume:
                self.load_checkpoint()
            else:
                torch.manual_seed(self.settings.seed + self.info.rank)
                self.check_run_dir(create=True)  # everything checked: only now does the run directory appear
            self.setup_logging()
            self.train()
            return self.finish()

    # -- setup ------------------------------------------------------------------------------------

    def check_run_dir(self, create: bool) -> None:
        """Rank 0 checks (and with ``create``, makes) the run directory; every rank raises the same error."""
        out, err = self.out, None
        if self.info.is_main:
            try:
                if not create:  # before the emptiness check: no second process between it and the rmtree
                    self.check_overlap()
                    self.lock.enter_context(output_lock(out))
                if self.resume:
                    if not (out / CHECKPOINT).is_file():
                        raise DgmrError(f"nothing to resume: {out / CHECKPOINT} does not exist")
                    if not create:  # under the lock: a killed run's partial checkpoint or export goes
                        remove_stale_temps(out)
                else:
                    check_output_dir(out, self.overwrite)
                    if create:
                        if out.is_dir():
                            shutil.rmtree(out)
                        out.mkdir(parents=True)
            except DgmrError as e:
                err = str(e)
            except OSError as e:
                err = f"cannot create the run directory {out}: {e.strerror or e}"
        err = D.broadcast_object(err, self.info)
        if err:
            raise DgmrError(err)

    def check_overlap(self) -> None:
        """The run directory must not be, contain or lie inside the teacher, student or data:
        ``--overwrite`` (and the export) would delete or change them."""
        data = [("data", d) for d in data_paths(self.data)]
        refuse_overlap(self.out, [("teacher", model_path(self.teacher)), ("student", model_path(self.student)), *data],
                       "run directory")

    def resolve_settings(self) -> None:
        """Settings (see :func:`resume_settings` on resume); a resumed run may take its
        teacher/student/data from its run_config when they were paths."""
        if self.resume:
            path = self.out / RUN_CONFIG
            self.saved = schema.run_config(schema.read_json_file(path, "the run's settings"), str(path))
            self.settings = resume_settings(self.saved["settings"], self.config, self.overrides)
            specs = [m for m in (self.saved.get("teacher"), self.saved.get("student")) if m and not is_dgmr_dir(m)]
            if self.settings.random_init and specs and not self.saved.get("random_init_seeded"):
                raise DgmrError(f"{path}: this run built its --random-init models without a seed (an older dgmr), so "
                                "a resume would train against a different random teacher: start the run again")
            self.teacher = self.teacher if self.teacher is not None else self.saved.get("teacher")
            self.student = self.student if self.student is not None else self.saved.get("student")
            self.data = self.data if self.data is not None else self.saved.get("data")
            if self.teacher is None or self.student is None or self.data is None:
                raise DgmrError("this run was started with in-memory models or data: pass them again to resume")
            self.check_overlap()  # the inputs may come from run_config.json
        else:
            self.settings = DistillSettings.resolve(self.config, **self.overrides)
        if self.teacher is None or self.student is None or self.data is None:
            raise DgmrError("distill needs a teacher, a student and data")

    def setup_models(self) -> None:
        """Open and pair teacher and student; put them on the device (the teacher frozen, in bf16
        on GPU under autocast; the student in fp32); probe for the parameters to train."""
        s = self.settings
        self.t_model, _, _ = _open(self.teacher, "teacher", s)
        self.s_model, s_src, self.s_cfg = _open(self.student, "student", s)
        if self.t_model is self.s_model:
            raise DgmrError("teacher and student are the same module object: pass a pruned copy as the student")
        self.s_src = s_src or self.student_source
        student_is_dir = isinstance(self.student, (str, os.PathLike)) and self.s_cfg is not None
        self.student_dir = Path(self.student) if student_is_dir else None
        self.family = check_pair(self.t_model, self.s_model)
        self.export_dtype = next(self.s_model.parameters()).dtype
        self.dcfg = self.family.data_config(self.t_model)
        self.image_size = s.image_size or self.dcfg["image_size"]

        self.device = self.info.device
        self.cuda = self.device.type == "cuda"
        bf16 = s.precision == "bf16" or (s.precision == "auto" and self.cuda)
        self.amp_dtype = torch.bfloat16 if bf16 else None
        teacher_dtype = self.amp_dtype if self.cuda and self.amp_dtype else None
        self.t_model.requires_grad_(False).eval().to(device=self.device, dtype=teacher_dtype)
        self.s_model.float().to(self.device)
        self.trainable = self._probe()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def attention_backend(self) -> contextlib.AbstractContextManager:
        """The ``attention`` setting's backend first, then PyTorch's usual order."""
        return attention_backend(self.settings.attention)

    def _probe(self) -> list[tuple[str, nn.Parameter]]:
        """One forward/backward on noise: the feature shapes must match, and only the parameters
        that get a gradient are trained (a CLIP text tower or an unused head stays frozen)."""
        s, family, t_model, s_model = self.settings, self.family, self.t_model, self.s_model
        vision = family.vision_root(s_model)[1]
        s_model.requires_grad_(False)
        vision.requires_grad_(True)
        s_model.train()
        torch.manual_seed(s.seed)
        x = torch.randn(2, 3, self.image_size, self.image_size, device=self.device)
        try:
            with torch.no_grad(), self.autocast():
                tf = family.features(t_model, x)
            with self.autocast():
                sf = family.features(s_model, x)
        except (RuntimeError, ValueError, AssertionError) as e:
            raise DgmrError(f"the models do not run at {self.image_size}px: {first_line(e)}") from e
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
        return trainable

    def setup_data(self) -> None:
        """The augmentation and this rank's loader; the run's length and peak lr follow from the data size."""
        s = self.settings
        transform = TrainTransform(self.image_size, self.dcfg["mean"], self.dcfg["std"], scale=s.crop_scale)
        self.workers = self._workers()
        self.loader = Loader(self.source, transform, self.info, s, self.workers, pin=self.cuda)
        self.steps_per_epoch = self.loader.batches_per_epoch // s.accum
        if s.steps is not None:
            self.total = int(s.steps)
        elif self.steps_per_epoch:
            epochs = s.epochs if s.epochs is not None else DEFAULT_EPOCHS
            self.total = max(1, int(round(epochs * self.steps_per_epoch)))
        else:
            raise DgmrError("the number of images in these shards is unknown: give --steps")
        self.global_batch = s.batch_size * self.info.world * s.accum
        self.peak_lr = s.lr if s.lr is not None else s.base_lr * self.global_batch / 256
        self.warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_fraction * self.total)

    def _workers(self) -> int:
        """DataLoader workers; a resumed run keeps the number it started with unless given one."""
        s, saved = self.settings, self.saved
        workers = s.workers if s.workers is not None else default_workers(self.source, self.info)
        if self.resume and s.workers is None and saved and saved.get("workers") is not None:
            workers = int(saved["workers"])  # as the run started
        if self.resume and self.source.kind == "shards" and saved and saved.get("workers") not in (None, workers):
            # each DataLoader worker streams its own share of the shards: the order depends on their number
            raise DgmrError("resume a shard run with the same number of DataLoader workers: "
                            f"--workers {saved['workers']}")
        return workers

    def wrap(self) -> None:
        """The student's feature call inside DDP, or FSDP2 per block (the teacher is never wrapped)."""
        self.net = FeatureNet(self.s_model, self.family)
        self.shell = None
        if self.sharded:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            if self.info.is_main:  # for the export: the architecture without a second copy of the weights
                self.shell = copy.deepcopy(self.s_model).to("meta")
            if self.amp_dtype and self.cuda:
                mp = MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32)
            else:
                mp = MixedPrecisionPolicy()
            for block in _block_modules(self.s_model, self.family):
                fully_shard(block, mp_policy=mp)
            fully_shard(self.net, mp_policy=mp)
            # the parameters are DTensors now
            self.trainable = [(n, p) for n, p in self.s_model.named_parameters() if p.requires_grad]
        elif self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.net, device_ids=[self.device.index] if self.cuda else None)
        self.t_net = FeatureNet(self.t_model, self.family)
        self.s_forward, self.t_forward = self.net, self.t_net
        self.compile_pending = self.compiling
        if self.compiling:  # compiled lazily, at the first step (see _micro_step for the fallback)
            mode = "max-autotune-no-cudagraphs" if self.settings.compile == "max-autotune" else None
            self.s_forward, self.t_forward = torch.compile(self.net, mode=mode), torch.compile(self.t_net, mode=mode)

    @property
    def compiling(self) -> bool:
        """``compile``: on, or auto on CUDA (FSDP2 stays eager under auto)."""
        mode = self.settings.compile
        return mode in ("on", "max-autotune") or (mode == "auto" and self.cuda and not self.sharded)

    def setup_optimizer(self) -> None:
        """AdamW over the trainable parameters (no weight decay on biases, norms, tokens,
        position embeddings), and the EMA when asked for."""
        s = self.settings
        decay = [p for n, p in self.trainable if p.ndim > 1 and not n.endswith(NO_DECAY_SUFFIXES)]
        ids = {id(p) for p in decay}
        no_decay = [p for _, p in self.trainable if id(p) not in ids]
        groups = [{"params": decay, "wd_scale": 1.0}, {"params": no_decay, "wd_scale": 0.0}]
        self.optim = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.peak_lr, betas=s.betas,
                                       weight_decay=s.weight_decay, fused=True if self.cuda else None)
        self.params = [p for _, p in self.trainable]
        self.state.ema = {n: p.detach().clone() for n, p in self.trainable} if s.ema else None

    def load_checkpoint(self) -> None:
        """Continue from the run's checkpoint: weights, optimizer, EMA, counters, and this rank's RNG."""
        ckpt = load_checkpoint(self.out, self.total)
        st = self.state
        st.step, st.images_seen, st.unreadable = int(ckpt["step"]), int(ckpt["images_seen"]), set(ckpt["unreadable"])
        st.unreadable_reads = int(ckpt.get("unreadable_reads", 0))
        self._load_weights(ckpt)
        rng = ckpt["rng"]
        torch.set_rng_state(rng[self.info.rank] if self.info.rank < len(rng) else rng[0])
        if self.cuda and ckpt.get("cuda_rng"):
            torch.cuda.set_rng_state(ckpt["cuda_rng"][min(self.info.rank, len(ckpt["cuda_rng"]) - 1)])

    def _load_weights(self, ckpt: dict[str, Any]) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.s_model, self.optim, model_state_dict=ckpt["student"],
                           optim_state_dict=ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            try:
                self.s_model.load_state_dict(ckpt["student"])
                self.optim.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                detail = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                              first_line(e))  # torch's first line only says "Error(s) in loading state_dict"
                raise DgmrError(f"the checkpoint {self.out / CHECKPOINT} does not fit the student "
                                f"{self.student}: {detail[:300]}") from None
        if self.state.ema is not None:
            with torch.no_grad():
                for n, t in self.state.ema.items():
                    if hasattr(t, "to_local"):
                        t.to_local().copy_(_shard_like(ckpt["ema"][n], t))
                    else:
                        t.copy_(ckpt["ema"][n])

    def setup_logging(self) -> None:
        """Rank 0: run_config.json for a new run, or metrics.jsonl cut back to the checkpoint on
        resume (so the file reads as one uninterrupted run); TensorBoard; the progress bar."""
        from tqdm.auto import tqdm

        st = self.state
        self.metrics_path = self.out / METRICS
        self.writer = None
        if self.info.is_main:
            if self.resume:
                rows = truncate_metrics(self.metrics_path, st.step)
                st.first_loss, st.last_loss = first_logged_loss(rows), last_logged_loss(rows)
            else:
                write_json(self.out / RUN_CONFIG, self.run_config())
            if self.settings.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=st.step + 1)
                except ImportError:
                    self.writer = None
        self.bar = tqdm(total=self.total, initial=st.step, desc="distill", unit="step",
                        disable=not (self.progress and self.info.is_main), dynamic_ncols=True)

    def run_config(self) -> dict[str, Any]:
        """run_config.json: the resolved settings and the numbers derived from them."""
        def as_path(x: Any) -> str | None:
            return str(x) if not isinstance(x, nn.Module) else None

        return {
            "teacher": as_path(self.teacher), "student": as_path(self.student),
            "data": str(self.data) if isinstance(self.data, (str, os.PathLike)) else None,
            "settings": self.settings.to_json(), "world_size": self.info.world, "global_batch": self.global_batch,
            "peak_lr": self.peak_lr, "warmup_steps": self.warmup, "total_steps": self.total,
            "steps_per_epoch": self.steps_per_epoch, "image_size": self.image_size, "mean": self.dcfg["mean"],
            "std": self.dcfg["std"], "family": self.family.name, "data_description": self.source.description,
            "workers": self.workers, "precision": "bf16" if self.amp_dtype else "fp32",
            "random_init_seeded": True}  # --random-init models come from settings.seed

    # -- training ---------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps up to ``total``; after each: log, checkpoint when due, ``on_step``;
        on SIGTERM/SIGUSR1 the step in progress finishes, then :meth:`stop_on_signal`."""
        s, st = self.settings, self.state
        st.sums = torch.zeros(5, device=self.device, dtype=torch.float64)  # loss, pooled, tokens, images, failed
        st.last_log_t = time.perf_counter()
        batches = self.loader.batches(st.step * s.accum, self.steps_per_epoch)
        st.epoch = st.step // self.steps_per_epoch if self.steps_per_epoch else 0
        with self.stop_signals(), self.closing_outputs():
            while st.step < self.total:
                lr, wd, grad_norm = self.train_step(batches)
                st.step += 1
                self.bar.update(1)
                checkpoint_now = st.step == self.total or (s.save_every and st.step % s.save_every == 0)
                row = None
                if st.step % s.log_every == 0 or checkpoint_now:  # a checkpoint's step is always logged
                    row = self.log(lr, wd, grad_norm)
                if checkpoint_now:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step({"step": st.step, "total_steps": self.total, "epoch": st.epoch, "metrics": row})
                if self.stop_requested():
                    self.stop_on_signal(row is None, (lr, wd, grad_norm), checkpoint_now)

    @contextlib.contextmanager
    def closing_outputs(self) -> Iterator[None]:
        """The progress bar and TensorBoard writer are closed however training ends."""
        try:
            yield
        finally:
            self.bar.close()
            if self.writer is not None:
                self.writer.close()

    @contextlib.contextmanager
    def stop_signals(self) -> Iterator[None]:
        """While training, SIGTERM (what SLURM and Kubernetes send before a preemption) and
        SIGUSR1 (SLURM's ``--signal``) only set a flag, read after each step; the previous
        handlers come back after. Main thread only (Python's rule for signal handlers)."""
        self.signal_received: int | None = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def flag(signum: int, frame: Any) -> None:
            self.signal_received = signum

        before = {sig: signal.signal(sig, flag) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def stop_requested(self) -> bool:
        """Whether any rank got a stop signal (all ranks stop after the same step)."""
        return D.any_rank(self.signal_received is not None, self.info)

    def stop_on_signal(self, log: bool, step_stats: tuple, saved: bool) -> None:
        """Log the step (a checkpoint's step always has its metrics line), write a checkpoint
        unless this step just did, and stop with :class:`Preempted` (CLI exit code 75)."""
        st = self.state
        if log:
            self.log(*step_stats)
        if not saved:
            self.save_checkpoint()
        self.ckpt_writer.wait()
        name = signal.Signals(self.signal_received).name if self.signal_received else "a signal on another rank"
        raise Preempted(f"{name} after step {st.step} of {self.total}: checkpoint {self.out / CHECKPOINT} written; "
                        f"continue with: dgmr distill --out {self.out} --resume")

    def train_step(self, batches: Iterator[tuple[int, torch.Tensor | None, list[str]]]
                   ) -> tuple[float, float, torch.Tensor | None]:
        """One optimizer step over ``accum`` micro-batches; (lr, weight decay, grad norm or None)."""
        accum = self.settings.accum
        for micro in range(accum):
            self.state.epoch, x, bad = next(batches)
            self.state.unreadable.update(bad)
            if bad:
                self.state.sums[4] += len(bad)
            self._micro_step(x, last=micro == accum - 1)
        return self._optimizer_step()

    def _micro_step(self, x: torch.Tensor | None, last: bool) -> None:
        """Forward and backward of one micro-batch; gradients sync across ranks on the ``last`` one only."""
        st = self.state
        weight = 1.0
        if x is None:  # every image of this micro-batch was unreadable: keep ranks in step, learn nothing
            x, weight = torch.zeros(1, 3, self.image_size, self.image_size), 0.0
        x = x.to(self.device, non_blocking=True)
        try:
            loss, lp, lt = self._forward_backward(x, last, weight)
        except Exception as e:  # torch.compile fails in many ways (dynamo, inductor, the C++ toolchain)
            if not self.compile_pending:
                raise
            self._compile_failed(e)
            loss, lp, lt = self._forward_backward(x, last, weight)
        self.compile_pending = False
        n = x.shape[0] * int(weight)
        st.sums[:3] += torch.stack([loss.detach(), lp, lt]).double() * n  # no host sync: summed on device
        st.sums[3] += n

    def _forward_backward(self, x: torch.Tensor, last: bool, weight: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.settings
        with torch.no_grad(), self.autocast(), self.attention_backend():
            tf = self.t_forward(x)
        sync = contextlib.nullcontext() if last or not self.ddp else self.net.no_sync()
        if self.sharded:
            self.net.set_requires_gradient_sync(last)
        with sync, self.attention_backend():
            with self.autocast():
                sf = self.s_forward(x)
            loss, lp, lt = feature_loss(sf, tf, s.loss, s.pooled_weight, s.tokens_weight)
            (loss * (weight / s.accum)).backward()
        return loss, lp, lt

    def _compile_failed(self, e: Exception) -> None:
        """The first compiled step failed: train eagerly (nothing was learned yet, so drop any
        partial gradients and redo the step). A compiler problem costs speed, not the run."""
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {first_line(e)}); training without it")
        self.s_forward, self.t_forward = self.net, self.t_net
        self.compile_pending = False
        self.optim.zero_grad(set_to_none=True)

    def _optimizer_step(self) -> tuple[float, float, torch.Tensor | None]:
        s, st = self.settings, self.state
        lr = lr_at(st.step, self.total, self.peak_lr, s.min_lr, self.warmup)
        wd = wd_at(st.step, self.total, s.weight_decay, s.weight_decay_end)
        for g in self.optim.param_groups:
            g["lr"], g["weight_decay"] = lr, wd * g["wd_scale"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s.clip_grad) if s.clip_grad else None
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        if st.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(st.ema.values()), self.params, 1 - s.ema)
        return lr, wd, grad_norm

    def log(self, lr: float, wd: float, grad_norm: torch.Tensor | None) -> dict[str, Any]:
        """The metrics row since the last log (summed over ranks; the one host sync of a step);
        stops the run on a non-finite loss. Rank 0 writes it."""
        st = self.state
        tot = D.all_reduce_sum(st.sums.clone(), self.info).tolist()
        now = time.perf_counter()
        imgs = tot[3]
        st.images_seen += int(imgs)
        st.unreadable_reads += int(tot[4])
        if not all(math.isfinite(v) for v in tot[:3]):
            ckpt = self.out / CHECKPOINT
            raise DgmrError(f"the loss is not finite at step {st.step} (lr {lr:.3g}): stopped; the last good "
                            f"checkpoint is {ckpt}" + (" (none yet)" if not ckpt.is_file() else "")
                            + "; try a lower --lr or --clip-grad")
        per_image = max(imgs, 1)
        row = {"step": st.step, "epoch": st.epoch, "loss": tot[0] / per_image, "loss_pooled": tot[1] / per_image,
               "loss_tokens": tot[2] / per_image, "lr": lr, "weight_decay": wd,
               "images_per_s": imgs / max(now - st.last_log_t, 1e-9), "images": st.images_seen,
               "time": round(time.time(), 3)}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        st.first_loss = row["loss"] if st.first_loss is None else st.first_loss
        st.last_loss = row["loss"]
        st.sums.zero_()
        st.last_log_t = now
        if self.info.is_main:
            append_jsonl(self.metrics_path, row)
            if self.writer is not None:
                for k in ("loss", "loss_pooled", "loss_tokens", "lr", "images_per_s"):
                    self.writer.add_scalar(f"distill/{k}", row[k], st.step)
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.2e}", img_s=f"{row['images_per_s']:.1f}")
        return row

    def save_checkpoint(self) -> None:
        """Every rank's state gathered, rank 0 writes it atomically. Non-finite weights are never
        saved: the previous checkpoint stays the last good one."""
        st, info = self.state, self.info
        local_bad = any(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in self.params)
        if D.all_reduce_sum(torch.tensor([float(local_bad)], device=self.device), info).item() > 0:
            raise DgmrError(f"the student's weights are not finite after step {st.step}: stopped; the last good "
                            f"checkpoint is {self.out / CHECKPOINT}; try a lower --lr or --clip-grad")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            msd, osd = get_state_dict(self.s_model, self.optim,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            msd, osd = self.s_model.state_dict(), self.optim.state_dict()
        ema_sd = None
        if st.ema is not None:
            ema_sd = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu() for n, t in st.ema.items()}
        rngs = D.all_gather_objects(torch.get_rng_state(), info)
        cuda_rngs = D.all_gather_objects(torch.cuda.get_rng_state(), info) if self.cuda else None
        bad = D.all_gather_objects(sorted(st.unreadable), info)
        if info.is_main:
            unreadable = sorted(set().union(*map(set, bad)))
            ckpt = checkpoint_dict(step=st.step, epoch=st.epoch, images_seen=st.images_seen, unreadable=unreadable,
                                   unreadable_reads=st.unreadable_reads,
                                   student=msd, optimizer=osd, ema=ema_sd, rng=rngs, cuda_rng=cuda_rngs,
                                   world_size=info.world)
            if self.cuda:  # snapshot to host memory, then the disk write overlaps the next steps
                self.ckpt_writer.write(_to_cpu(ckpt), self.out / CHECKPOINT)
            else:
                atomic_torch_save(ckpt, self.out / CHECKPOINT)
        D.barrier(info)

    # -- end ------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """The EMA becomes the student; ranks must hold identical weights; rank 0 exports the
        student and writes summary.json. Returns the summary."""
        st, info = self.state, self.info
        self.ckpt_writer.wait()  # the last checkpoint is on disk before anything is exported
        if st.images_seen == 0:  # summed over ranks: every rank stops here together
            raise DgmrError(f"no readable image in {self.source.description} ({len(st.unreadable)} unreadable on "
                            "this process): nothing was learned, nothing is exported")
        if st.ema is not None:
            with torch.no_grad():
                for (_, p), t in zip(self.trainable, st.ema.values()):
                    p.copy_(t)
        prints = D.all_gather_objects(_fingerprint(self.s_model), info)
        ranks_identical = all(p == prints[0] for p in prints)
        unreadable = sorted(set().union(*map(set, D.all_gather_objects(sorted(st.unreadable), info))))
        full = None
        if self.sharded:  # a collective: every rank takes part, rank 0 keeps the weights
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.s_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        summary = self.summary(unreadable, ranks_identical)
        if not ranks_identical:
            raise DgmrError(f"student weights differ across ranks after training: {prints}")
        if info.is_main:
            summary["export"] = self.export(summary, full)
            write_json(self.out / SUMMARY, summary)
        D.barrier(info)
        if isinstance(self.student, nn.Module):
            self.s_model.to(self.export_dtype)
        return summary

    def summary(self, unreadable: list[str], ranks_identical: bool) -> dict[str, Any]:
        st, s = self.state, self.settings

        def name(x: Any) -> str:
            return str(x) if not isinstance(x, nn.Module) else type(x).__name__

        seconds = time.perf_counter() - self.t_start
        return {
            "out": str(self.out), "teacher": name(self.teacher), "student": name(self.student),
            "family": self.family.name, "steps": st.step,
            "epochs": round(st.step / self.steps_per_epoch, 3) if self.steps_per_epoch else None,
            "global_batch": self.global_batch, "peak_lr": self.peak_lr, "first_loss": st.first_loss,
            "final_loss": st.last_loss, "images_seen": st.images_seen, "unreadable_images": len(unreadable),
            "unreadable_examples": unreadable[:5], "ignored_files": self.source.ignored_files,
            "world_size": self.info.world, "ranks_identical": ranks_identical, "resumed": bool(self.resume),
            "ema": s.ema, "seconds": round(seconds, 2),
            "images_per_s": round(st.images_seen / seconds, 2) if seconds > 0 and not self.resume else None,
            **self.unreadable_report(),
        }

    def unreadable_report(self) -> dict[str, Any]:
        """The fraction of image reads that failed; above the ``unreadable_warn`` setting, a
        ``warning`` (in the summary, and on stderr from rank 0): the run learned from less
        data than it was given."""
        st = self.state
        reads = st.images_seen + st.unreadable_reads
        fraction = st.unreadable_reads / reads if reads else 0.0
        out: dict[str, Any] = {"unreadable_fraction": round(fraction, 4)}
        if fraction > self.settings.unreadable_warn:
            out["warning"] = (f"{fraction:.0%} of the image reads failed ({st.unreadable_reads} of {reads}; "
                              f"threshold {self.settings.unreadable_warn:.0%}): check the data "
                              f"({', '.join(sorted(st.unreadable)[:3])} ...)")
            if self.info.is_main:
                print(f"dgmr: WARNING: {printable(out['warning'])}", file=sys.stderr, flush=True)
        return out

    def export(self, summary: dict[str, Any], full_state: dict[str, torch.Tensor] | None) -> Any:
        """Rank 0: the student into the run directory in ``dgmr prune``'s format; returns how
        the library's own format loads it (or why it was skipped)."""
        model = _unsharded_copy(self.shell, full_state) if self.sharded else self.s_model
        model = model.cpu()
        info = {k: summary[k] for k in ("teacher", "steps", "final_loss", "images_seen", "global_batch", "ema")}
        cfg = export_student(model, self.out, self.s_src, self.s_cfg, self.export_dtype, info, self.student_dir)
        return cfg["native_export"].get("load", cfg["native_export"].get("skipped"))


# ---------------------------------------------------------------------------------------
# the entry point


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
    recipe = None
    try:
        recipe = DistillRecipe(teacher, student, data, out, info=info, config=config, overrides=settings, resume=resume,
                               overwrite=overwrite, progress=progress, on_step=on_step, student_source=student_source,
                               t_start=t_start)
        return recipe.run()
    finally:
        for state in states:
            _restore_module_state(*state)
        if info.started_here:
            # FSDP's hooks form reference cycles that can outlive this call, holding gloo work;
            # freed at interpreter exit they abort the process: free them while all is alive
            del recipe
            gc.collect()
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
