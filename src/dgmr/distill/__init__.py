"""Distill: label-free feature distillation that recovers a pruned model.

:func:`distill` is the entry point; :mod:`.settings` holds every setting (the CLI flags are
generated from it), :mod:`.losses` the objective and schedules, :mod:`.loader` the stream of
training micro-batches (the images come from :mod:`dgmr.data.unlabeled`), :mod:`.recipe` the
training recipe in named phases (:class:`DistillRecipe`). The recipe delegates to
:mod:`.pair` (opening and pairing teacher and student), :mod:`.parallel` (DDP, FSDP2,
torch.compile), :mod:`.state` (training state and the checkpoint file), :mod:`.rundir` (the
run directory and its files) and :mod:`.preemption` (stop signals). The recipe is
docs/method.md, "Distillation recipe"; the run directory is described in docs/distill.md.
"""
from .losses import feature_loss, lr_at, wd_at
from .recipe import DistillRecipe, distill
from .rundir import CHECKPOINT, METRICS, RUN_CONFIG, SUMMARY, load_checkpoint
from .settings import LOSSES, PRECISIONS, DistillSettings

__all__ = ["CHECKPOINT", "LOSSES", "METRICS", "PRECISIONS", "RUN_CONFIG", "SUMMARY", "DistillRecipe", "DistillSettings",
           "distill", "feature_loss", "load_checkpoint", "lr_at", "wd_at"]
