"""The distillation recipe: label-free feature distillation that recovers a pruned model.

The method is docs/method.md, "Distillation recipe". The teacher is the original model:
frozen, eval mode, no grad, never wrapped. The student (a pruned copy, same family) sees the
same augmented batch and learns to reproduce the teacher's final-layer features
(``family.features``: pooled/CLS feature + patch tokens) with MSE (or cosine) losses, weighted
1:1 by default. The optimiser and schedule default to the paper's recipe: AdamW betas
(0.9, 0.95), lr = base_lr x global_batch / 256 (scaled down for a student that starts near
its teacher: :mod:`.lr_rule`), linear warmup then cosine down to min_lr, weight decay cosine
0.04 -> 0.2, optional EMA. The same loss on held-out images (``val_loss``, from step 0), the
best weights and early stopping are :mod:`.validation`'s.

:func:`~dgmr.distill.distill` is the entry point; it builds a :class:`DistillRecipe` and runs
its phases (:meth:`DistillRecipe.run` lists them in order); the recipe owns the phase order
and the training step and delegates the rest. It runs alone on a CPU or GPU or under
``torchrun`` (DDP by default, FSDP2 ``fully_shard`` per transformer block with ``fsdp=True``:
:mod:`.parallel`). Only rank 0 writes: the run directory and its files are :mod:`.rundir`'s,
the training state and the checkpoint format :mod:`.state`'s. :mod:`.pair` opens and pairs
teacher and student; :mod:`.preemption` turns a stop signal into a checkpoint and a clean stop.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..core import dist as D
from ..core.errors import DgmrError, Preempted
from ..data.unlabeled import DataSource, TrainTransform, resolve_data
from ..io.images import printable
from ..io.output import write_json
from ..models.artifact import load_kept_indices
from ..models.families import Family
from ..models.preprocess import eval_transform
from ..models.sources import Source
from .loader import Loader, default_workers
from .losses import decay_groups, feature_loss, lr_at, wd_at
from .lr_rule import choose_peak_lr, paper_lr
from .pair import check_pair, open_model, probe_trainable
from .parallel import (
    FeatureCalls,
    FeatureNet,
    attention_backend,
    compile_mode,
    fingerprint,
    full_model_state_dict,
    full_state_dicts,
    full_tensor,
    load_training_state,
    local_tensor,
    unsharded_copy,
    wrap_student,
)
from .preemption import StopSignals
from .rundir import (
    CHECKPOINT,
    METRICS,
    RUN_CONFIG,
    SUMMARY,
    MetricsLog,
    RunDir,
    check_resumed_held_out,
    export_student,
    first_logged_loss,
    last_logged_loss,
    load_checkpoint,
    resume_settings,
    resumed_inputs,
    resumed_val_data,
    resumed_workers,
    run_config,
    run_summary,
    truncate_metrics,
)
from .settings import DEFAULT_EPOCHS, DistillSettings
from .state import BackgroundWriter, TrainState, atomic_torch_save, checkpoint_dict, to_cpu
from .validation import BestWeights, HeldOut, Tracker, ValLoss, evaluated_weights, held_out_images, progress_postfix

__all__ = ["DistillRecipe"]

EVALUATIONS = 20  # evaluations over a run when eval_every is unset


class DistillRecipe:
    """One distillation run in named phases (torchtune's recipe shape); :meth:`run` calls them in order.

    Each ``setup_*`` phase owns the attributes it sets: :meth:`resolve_settings` ``settings``
    (and ``saved``, the run_config of a resumed run); :meth:`setup_models` the models, their
    family, device and precision, and ``trainable`` (the probe's verdict); :meth:`setup_data`
    the loader, the held-out images and the run's numbers (``total`` steps, ``eval_every`` ...);
    :meth:`wrap` ``net`` (the student's feature call, inside DDP/FSDP) and ``calls`` (what a
    step runs, compiled or not); :meth:`setup_optimizer` ``optim`` and the EMA;
    :meth:`evaluate_start` the step-0 ``val_loss`` and ``peak_lr`` (:meth:`load_checkpoint` on
    resume); :meth:`setup_logging` the metrics log (metrics.jsonl, TensorBoard) and progress
    bar. What changes while training is in ``state`` (a :class:`~.state.TrainState`),
    ``tracker`` (val_loss so far: :class:`~.validation.Tracker`) and ``best`` (the best weights).
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
    calls: FeatureCalls
    shell: nn.Module | None  # FSDP, rank 0: the student's architecture on the meta device, for the export
    optim: torch.optim.Optimizer
    loader: Loader
    metrics: MetricsLog
    total: int
    steps_per_epoch: int
    held_out: HeldOut | None
    eval_every: int
    peak_lr: float
    lr_choice: dict[str, Any]

    def __init__(self, teacher: nn.Module | str | os.PathLike | None, student: nn.Module | str | os.PathLike | None,
                 data: Any, out: Path, *, info: D.DistInfo, val_data: Any = None,
                 config: str | os.PathLike | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 resume: bool = False, overwrite: bool = False, progress: bool = True,
                 on_step: Callable[[dict[str, Any]], None] | None = None, student_source: Source | None = None,
                 t_start: float | None = None):
        self.teacher, self.student, self.data, self.out = teacher, student, data, Path(out)
        self.val_data = val_data
        self.info, self.config, self.overrides = info, config, dict(overrides or {})
        self.resume, self.progress = resume, progress
        self.on_step, self.student_source = on_step, student_source
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.saved = None
        self.run_dir = RunDir(self.out, info, resume=resume, overwrite=overwrite)
        self.state = TrainState()
        self.tracker, self.best = Tracker(), BestWeights(info)
        self.ckpt_writer = BackgroundWriter()
        self.signals = StopSignals()

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
        # rank 0's hold on the run directory (taken by check_run_dir), released however run ends
        with self.run_dir.lock:
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
                self.evaluate_start()
                self.check_run_dir(create=True)  # everything checked: only now does the run directory appear
            self.setup_logging()
            self.train()
            return self.finish()

    # -- setup ------------------------------------------------------------------------------------

    def check_run_dir(self, create: bool) -> None:
        """Rank 0 checks (and with ``create``, makes) the run directory: :meth:`.rundir.RunDir.check`."""
        self.run_dir.check(create, self.teacher, self.student, self.data, self.val_data)

    def resolve_settings(self) -> None:
        """Settings (see :func:`~.rundir.resume_settings` on resume); a resumed run may take its
        teacher/student/data from its run_config when they were paths."""
        if self.resume:
            self.saved = self.run_dir.read_run_config()
            self.settings = resume_settings(self.saved["settings"], self.config, self.overrides)
            self.teacher, self.student, self.data = resumed_inputs(self.out, self.saved, self.settings, self.teacher,
                                                                   self.student, self.data)
            self.val_data = resumed_val_data(self.saved, self.val_data)
            if "held_out" not in self.saved:  # a run of an older dgmr held nothing out: neither does its resume
                self.settings.val_fraction = 0.0
            # the inputs may come from run_config.json
            self.run_dir.check_overlap(self.teacher, self.student, self.data, self.val_data)
        else:
            self.settings = DistillSettings.resolve(self.config, **self.overrides)
        if self.teacher is None or self.student is None or self.data is None:
            raise DgmrError("distill needs a teacher, a student and data")
        s = self.settings
        if self.val_data is None and s.val_fraction == 0 and (s.early_stop or s.target_val_loss is not None):
            raise DgmrError("early_stop and target_val_loss need evaluations: give --val-data, or a --val-fraction "
                            "above 0")

    def setup_models(self) -> None:
        """Open and pair teacher and student; put them on the device (the teacher frozen, in bf16
        on GPU under autocast; the student in fp32); probe for the parameters to train."""
        s = self.settings
        self.t_model, self.t_src, _ = open_model(self.teacher, "teacher", s)
        self.s_model, s_src, self.s_cfg = open_model(self.student, "student", s)
        if self.t_model is self.s_model:
            raise DgmrError("teacher and student are the same module object: pass a pruned copy as the student")
        self.s_src = s_src or self.student_source
        student_is_dir = isinstance(self.student, (str, os.PathLike)) and self.s_cfg is not None
        self.student_dir = Path(self.student) if student_is_dir else None
        if self.student_dir is not None:  # before training: the export copies it into the run
            load_kept_indices(self.student_dir)
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
        self.trainable = probe_trainable(self.t_model, self.s_model, self.family, image_size=self.image_size,
                                         device=self.device, seed=s.seed, autocast=self.autocast)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def attention_backend(self) -> contextlib.AbstractContextManager:
        """The ``attention`` setting's backend first, then PyTorch's usual order."""
        return attention_backend(self.settings.attention)

    def setup_data(self) -> None:
        """The held-out images, the augmentation and this rank's loader; the run's length and
        evaluation interval follow from the data size."""
        s = self.settings
        self.source, items, where = held_out_images(self.source, self.val_data, s)
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
        self.warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_fraction * self.total)
        self.eval_every = s.eval_every or max(1, math.ceil(self.total / EVALUATIONS))
        self.held_out = None
        if items:
            tf = eval_transform(self.t_model, self.family, source=self.t_src, image_size=self.image_size)
            self.held_out = HeldOut(items, tf, self.info, batch_size=s.batch_size, image_size=self.image_size,
                                    description=where)
            self.state.unreadable.update(self.held_out.unreadable)
        if self.resume:
            check_resumed_held_out(self.saved, self.held_out)

    def _workers(self) -> int:
        """DataLoader workers; a resumed run keeps the number it started with unless given one."""
        s = self.settings
        workers = s.workers if s.workers is not None else default_workers(self.source, self.info)
        if self.resume:
            workers = resumed_workers(self.saved, s.workers, workers, self.source.kind == "shards")
        return workers

    def wrap(self) -> None:
        """The student's feature call inside DDP, or FSDP2 per block (the teacher is never wrapped);
        both calls compiled when the ``compile`` setting asks (at the first step: :meth:`_micro_step`)."""
        self.net, self.shell = wrap_student(self.s_model, self.family, self.info, fsdp=self.sharded,
                                            param_dtype=self.amp_dtype if self.cuda else None)
        if self.sharded:  # the parameters are DTensors now
            self.trainable = [(n, p) for n, p in self.s_model.named_parameters() if p.requires_grad]
        mode = compile_mode(self.settings.compile, self.cuda, self.sharded)
        self.calls = FeatureCalls(self.net, FeatureNet(self.t_model, self.family), mode)

    def setup_optimizer(self) -> None:
        """AdamW over the trainable parameters (no weight decay on biases, norms, tokens,
        position embeddings), and the EMA when asked for."""
        s = self.settings  # the lr is set at every step (the peak is chosen at step 0)
        self.optim = torch.optim.AdamW(decay_groups(self.trainable), lr=paper_lr(s, self.global_batch), betas=s.betas,
                                       weight_decay=s.weight_decay, fused=True if self.cuda else None)
        self.params = [p for _, p in self.trainable]
        self.state.ema = {n: p.detach().clone() for n, p in self.trainable} if s.ema else None

    def evaluate_start(self) -> None:
        """val_loss before any update (step 0), and the peak lr fitted to it (:func:`~.lr_rule.choose_peak_lr`)."""
        self.start = self.evaluate(scale=True)
        self.peak_lr, self.lr_choice = choose_peak_lr(self.settings, self.global_batch, self.start)

    def evaluate(self, scale: bool = False) -> ValLoss | None:
        """val_loss of the weights the run would export (the EMA's with ``ema``) on the held-out
        images; tracked, and the best weights kept. None without held-out images."""
        if self.held_out is None:
            return None
        st = self.state
        ema = list(st.ema.values()) if st.ema is not None else None
        with evaluated_weights(self.s_model, self.params, ema), self.attention_backend():
            val = self.held_out.evaluate(self.calls.student_net, self.calls.teacher_net, self.settings, self.autocast,
                                         scale=scale)
            if self.sharded:  # FSDP keeps the root's gathered weights after a forward: the EMA's, here
                self.net.reshard()
            if self.tracker.update(st.step, val.loss, self.settings, final=st.step == self.total):
                self.best.take(self.trainable, self.s_model)
        return val

    def load_checkpoint(self) -> None:
        """Continue from the run's checkpoint: weights, optimizer, EMA, counters, val_loss so far,
        the best weights, and this rank's RNG; the peak lr is the one the run chose."""
        ckpt = load_checkpoint(self.out, self.total)
        self.state.restore_counters(ckpt)
        load_training_state(self.s_model, self.optim, self.state.ema, ckpt, sharded=self.sharded,
                            where=f"the checkpoint {self.out / CHECKPOINT} does not fit the student {self.student}")
        self.tracker = Tracker.from_state(ckpt.get("held_out"), str(self.out / CHECKPOINT))
        self.best.resume(ckpt, self.tracker, self.trainable, self.s_model)
        self.peak_lr = float(self.saved["peak_lr"])
        self.lr_choice = self.saved.get("lr_choice") or {"rule": "recorded", "peak_lr": self.peak_lr}
        rng = ckpt["rng"]
        torch.set_rng_state(rng[self.info.rank] if self.info.rank < len(rng) else rng[0])
        if self.cuda and ckpt.get("cuda_rng"):
            torch.cuda.set_rng_state(ckpt["cuda_rng"][min(self.info.rank, len(ckpt["cuda_rng"]) - 1)])

    def setup_logging(self) -> None:
        """Rank 0: run_config.json and the step-0 metrics line (val_loss) for a new run, or
        metrics.jsonl cut back to the checkpoint on resume (so the file reads as one
        uninterrupted run); TensorBoard; the progress bar."""
        from tqdm.auto import tqdm

        st, main = self.state, self.info.is_main
        if main and self.resume:
            rows = truncate_metrics(self.out / METRICS, st.step)
            st.first_loss, st.last_loss = first_logged_loss(rows), last_logged_loss(rows)
        elif main:
            write_json(self.out / RUN_CONFIG, self.run_config())
        self.metrics = MetricsLog(self.out, enabled=main, tensorboard=self.settings.tensorboard, step=st.step)
        self.bar = tqdm(total=self.total, initial=st.step, desc="distill", unit="step",
                        disable=not (self.progress and main), dynamic_ncols=True)
        if not self.resume and self.start is not None:
            self.metrics.write({"step": 0, "epoch": 0, **self.start.row(), "peak_lr": self.peak_lr, "images": 0,
                                "time": round(time.time(), 3)})
            self.show()

    def run_config(self) -> dict[str, Any]:
        """run_config.json: :func:`.rundir.run_config` of this run."""
        return run_config(self.teacher, self.student, self.data, self.settings, world_size=self.info.world,
                          global_batch=self.global_batch, peak_lr=self.peak_lr, warmup_steps=self.warmup,
                          total_steps=self.total, steps_per_epoch=self.steps_per_epoch, image_size=self.image_size,
                          data_config=self.dcfg, family=self.family.name, data_description=self.source.description,
                          workers=self.workers, precision="bf16" if self.amp_dtype else "fp32",
                          val_data=self.val_data, held_out=self.held_out.summary() if self.held_out else None,
                          eval_every=self.eval_every, lr_choice=self.lr_choice)

    # -- training ---------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps up to ``total``; after each: log, checkpoint when due, ``on_step``;
        on SIGTERM/SIGUSR1 the step in progress finishes, then :meth:`stop_on_signal`."""
        s, st = self.settings, self.state
        st.sums = torch.zeros(5, device=self.device, dtype=torch.float64)  # loss, pooled, tokens, images, failed
        st.last_log_t = time.perf_counter()
        batches = self.loader.batches(st.step * s.accum, self.steps_per_epoch)
        st.epoch = st.step // self.steps_per_epoch if self.steps_per_epoch else 0
        with self.signals.catching(), self.closing_outputs():
            while st.step < self.total and self.tracker.stopped is None:
                lr, wd, grad_norm = self.train_step(batches)
                st.step += 1
                self.bar.update(1)
                due = self.held_out is not None and (st.step % self.eval_every == 0 or st.step == self.total)
                val = self.evaluate() if due else None
                checkpoint_now = (st.step == self.total or self.tracker.stopped is not None
                                  or (s.save_every and st.step % s.save_every == 0))
                row = None
                if st.step % s.log_every == 0 or checkpoint_now or val:  # checkpoints and evaluations are logged
                    row = self.log(lr, wd, grad_norm, val)
                if checkpoint_now:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step({"step": st.step, "total_steps": self.total, "epoch": st.epoch, "metrics": row,
                                  "stopped": self.tracker.stopped})
                if self.signals.requested(self.info):
                    self.stop_on_signal(row is None, (lr, wd, grad_norm), checkpoint_now)

    @contextlib.contextmanager
    def closing_outputs(self) -> Iterator[None]:
        """The progress bar and TensorBoard writer are closed however training ends."""
        try:
            yield
        finally:
            self.bar.close()
            self.metrics.close()

    def stop_on_signal(self, log: bool, step_stats: tuple, saved: bool) -> None:
        """Log the step (a checkpoint's step always has its metrics line), write a checkpoint
        unless this step just did, and stop with :class:`Preempted` (CLI exit code 75)."""
        st = self.state
        if log:
            self.log(*step_stats)
        if not saved:
            self.save_checkpoint()
        self.ckpt_writer.wait()
        raise Preempted(f"{self.signals.name()} after step {st.step} of {self.total}: checkpoint "
                        f"{self.out / CHECKPOINT} written; continue with: dgmr distill --out {self.out} --resume",
                        self.signals.received)

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
            if not self.calls.pending:
                raise
            # nothing was learned yet: drop any partial gradients and redo the step eagerly
            self.calls.fall_back_to_eager(e)
            self.optim.zero_grad(set_to_none=True)
            loss, lp, lt = self._forward_backward(x, last, weight)
        self.calls.pending = False
        n = x.shape[0] * int(weight)
        st.sums[:3] += torch.stack([loss.detach(), lp, lt]).double() * n  # no host sync: summed on device
        st.sums[3] += n

    def _forward_backward(self, x: torch.Tensor, last: bool, weight: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.settings
        with torch.no_grad(), self.autocast(), self.attention_backend():
            tf = self.calls.teacher(x)
        sync = contextlib.nullcontext() if last or not self.ddp else self.net.no_sync()
        if self.sharded:
            self.net.set_requires_gradient_sync(last)
        with sync, self.attention_backend():
            with self.autocast():
                sf = self.calls.student(x)
            loss, lp, lt = feature_loss(sf, tf, s.loss, s.pooled_weight, s.tokens_weight)
            (loss * (weight / s.accum)).backward()
        return loss, lp, lt

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

    def log(self, lr: float, wd: float, grad_norm: torch.Tensor | None, val: ValLoss | None = None) -> dict[str, Any]:
        """The metrics row since the last log (summed over ranks; the one host sync of a step),
        with the step's val_loss when it was evaluated; stops the run on a non-finite loss.
        Rank 0 writes it."""
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
            row["grad_norm"] = float(full_tensor(grad_norm))
        if val is not None:
            row.update(val.row())
        st.first_loss = row["loss"] if st.first_loss is None else st.first_loss
        st.last_loss = row["loss"]
        st.sums.zero_()
        st.last_log_t = now
        self.metrics.write(row)
        self.show(row)
        return row

    def show(self, row: dict[str, Any] | None = None) -> None:
        """Rank 0's progress bar: the latest loss, val_loss (and the best so far), lr, speed."""
        if self.info.is_main:
            self.bar.set_postfix(progress_postfix(row, self.tracker))

    def save_checkpoint(self) -> None:
        """Every rank's state gathered, rank 0 writes it atomically. Non-finite weights are never
        saved: the previous checkpoint stays the last good one."""
        st, info = self.state, self.info
        local_bad = any(not torch.isfinite(local_tensor(p)).all() for p in self.params)
        if D.all_reduce_sum(torch.tensor([float(local_bad)], device=self.device), info).item() > 0:
            raise DgmrError(f"the student's weights are not finite after step {st.step}: stopped; the last good "
                            f"checkpoint is {self.out / CHECKPOINT}; try a lower --lr or --clip-grad")
        msd, osd = full_state_dicts(self.s_model, self.optim, self.sharded)
        ema_sd = {n: full_tensor(t).cpu() for n, t in st.ema.items()} if st.ema is not None else None
        rngs = D.all_gather_objects(torch.get_rng_state(), info)
        cuda_rngs = D.all_gather_objects(torch.cuda.get_rng_state(), info) if self.cuda else None
        bad = D.all_gather_objects(sorted(st.unreadable), info)
        if info.is_main:
            unreadable = sorted(set().union(*map(set, bad)))
            # the best weights, unless they are this checkpoint's own (then a resume takes them from it)
            own = self.tracker.best_step == st.step and st.ema is None
            ckpt = checkpoint_dict(step=st.step, epoch=st.epoch, images_seen=st.images_seen, unreadable=unreadable,
                                   unreadable_reads=st.unreadable_reads,
                                   student=msd, optimizer=osd, ema=ema_sd, rng=rngs, cuda_rng=cuda_rngs,
                                   world_size=info.world, held_out=self.tracker.state_dict(),
                                   best_weights=None if own else self.best.tensors)
            if self.cuda:  # snapshot to host memory, then the disk write overlaps the next steps
                self.ckpt_writer.write(to_cpu(ckpt), self.out / CHECKPOINT)
            else:
                atomic_torch_save(ckpt, self.out / CHECKPOINT)
        D.barrier(info)

    # -- end ------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """The EMA becomes the student; ranks must hold identical weights; rank 0 exports the
        student (the best weights with ``export best``) and writes summary.json. Returns the summary."""
        st, info = self.state, self.info
        self.ckpt_writer.wait()  # the last checkpoint is on disk before anything is exported
        if st.images_seen == 0 and st.step > 0:  # summed over ranks: every rank stops here together
            raise DgmrError(f"no readable image in {self.source.description} ({len(st.unreadable)} unreadable on "
                            "this process): nothing was learned, nothing is exported")
        if st.ema is not None:
            with torch.no_grad():
                for (_, p), t in zip(self.trainable, st.ema.values()):
                    p.copy_(t)
        prints = D.all_gather_objects(fingerprint(self.s_model), info)
        ranks_identical = all(p == prints[0] for p in prints)
        unreadable = sorted(set().union(*map(set, D.all_gather_objects(sorted(st.unreadable), info))))
        full = full_model_state_dict(self.s_model) if self.sharded else None  # a collective: rank 0 keeps it
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
        """summary.json less its export (:func:`.rundir.run_summary`); rank 0 also prints its
        ``warning`` on stderr: the run learned from less data than it was given."""
        summary = run_summary(self.state, self.settings, out=self.out, teacher=self.teacher, student=self.student,
                              family=self.family.name, steps_per_epoch=self.steps_per_epoch,
                              global_batch=self.global_batch, peak_lr=self.peak_lr, source=self.source,
                              world_size=self.info.world, ranks_identical=ranks_identical, resumed=bool(self.resume),
                              seconds=time.perf_counter() - self.t_start, unreadable=unreadable)
        summary.update(self.tracker.summary(), lr=self.lr_choice, eval_every=self.eval_every if self.held_out else None,
                       held_out=self.held_out.summary() if self.held_out else None,
                       exported=self.tracker.exported(self.settings.export, self.state.step))
        if "warning" in summary and self.info.is_main:
            print(f"dgmr: WARNING: {printable(summary['warning'])}", file=sys.stderr, flush=True)
        return summary

    def export(self, summary: dict[str, Any], full_state: dict[str, torch.Tensor] | None) -> Any:
        """Rank 0: the student (its best weights with ``export best``) into the run directory in
        ``dgmr prune``'s format; returns how the library's own format loads it (or why it was skipped)."""
        if summary["exported"]["weights"] == "best":
            if self.sharded:
                self.best.put_into(full_state)
            else:  # a student module given in place ends holding what is exported
                self.best.load_into(self.s_model)
        model = (unsharded_copy(self.shell, full_state) if self.sharded else self.s_model).cpu()
        info = {k: summary[k] for k in ("teacher", "steps", "final_loss", "images_seen", "global_batch", "ema",
                                        "exported")}
        cfg = export_student(model, self.out, self.s_src, self.s_cfg, self.export_dtype, info, self.student_dir)
        return cfg["native_export"].get("load", cfg["native_export"].get("skipped"))
