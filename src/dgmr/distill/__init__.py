"""Distill: label-free feature distillation that recovers a pruned model.

:func:`distill` is the entry point; :mod:`.settings` holds every setting (the CLI flags are
generated from it), :mod:`.losses` the objective and schedules, :mod:`.data` the image
pipeline, :mod:`.recipe` the training recipe in named phases (:class:`DistillRecipe`),
:mod:`.checkpoint` the run directory's files. The recipe is docs/method.md, "Distillation
recipe"; the run directory is described in docs/distill.md.
"""
from .checkpoint import CHECKPOINT, METRICS, RUN_CONFIG, SUMMARY, load_checkpoint
from .losses import feature_loss, lr_at, wd_at
from .recipe import DistillRecipe, distill
from .settings import LOSSES, PRECISIONS, DistillSettings

__all__ = ["CHECKPOINT", "LOSSES", "METRICS", "PRECISIONS", "RUN_CONFIG", "SUMMARY", "DistillRecipe", "DistillSettings",
           "distill", "feature_loss", "load_checkpoint", "lr_at", "wd_at"]
