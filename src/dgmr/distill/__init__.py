"""Distill: label-free feature distillation that recovers a pruned model.

:func:`distill` is the entry point; :mod:`.settings` holds every setting (the CLI flags are
generated from it), :mod:`.losses` the objective and schedules, :mod:`.loader` the stream of
training micro-batches (the images come from :mod:`dgmr.data.unlabeled`), :mod:`.recipe` the
training recipe in named phases (:class:`DistillRecipe`). The recipe delegates to
:mod:`.pair` (opening and pairing teacher and student), :mod:`.parallel` (DDP, FSDP2,
torch.compile), :mod:`.validation` (the held-out loss, the best weights, early stopping),
:mod:`.lr_rule` (the peak learning rate), :mod:`.state` (training state and the checkpoint
file), :mod:`.rundir` (the run directory and its files) and :mod:`.preemption` (stop signals).
The recipe is docs/method.md, "Distillation recipe"; the run directory is described in
docs/distill.md.
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..core import dist as D
from ..models.sources import Source
from .losses import feature_loss, lr_at, wd_at
from .pair import module_state, restore_module_state
from .recipe import DistillRecipe
from .rundir import CHECKPOINT, METRICS, RUN_CONFIG, SUMMARY, load_checkpoint
from .settings import LOSSES, PRECISIONS, DistillSettings

__all__ = ["CHECKPOINT", "LOSSES", "METRICS", "PRECISIONS", "RUN_CONFIG", "SUMMARY", "DistillRecipe", "DistillSettings",
           "distill", "feature_loss", "load_checkpoint", "lr_at", "wd_at"]


def distill(
    teacher: nn.Module | str | os.PathLike | None,
    student: nn.Module | str | os.PathLike | None,
    data: Any,
    out: str | os.PathLike,
    *,
    val_data: Any = None,
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
    ``nn.Module`` s (a student module is trained in place and ends holding the exported
    weights). ``data``: a directory of images, a text file of image paths, WebDataset shards,
    a list of PIL images/paths/image tensors, or a torch Dataset of (3, H, W) image tensors in
    [0, 1]. ``val_data``: held-out images in any of those forms (default: a seeded slice of
    ``data``, the ``val_fraction`` setting). ``settings``: the fields of
    :class:`DistillSettings` (they override ``config``, a YAML/JSON file or dict).
    ``resume``: continue the run in ``out`` from its checkpoint, with its saved settings
    (teacher/student/data/val_data may then be None when they were given as paths).
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
    states = [module_state(m, full=m is teacher) for m in (teacher, student) if isinstance(m, nn.Module)]
    recipe = None
    try:
        recipe = DistillRecipe(teacher, student, data, out, info=info, val_data=val_data, config=config,
                               overrides=settings, resume=resume, overwrite=overwrite, progress=progress,
                               on_step=on_step, student_source=student_source, t_start=t_start)
        return recipe.run()
    finally:
        for state in states:
            restore_module_state(*state)
        if info.started_here:
            # FSDP's hooks form reference cycles that can outlive this call, holding gloo work;
            # freed at interpreter exit they abort the process: free them while all is alive
            del recipe
            gc.collect()
        D.cleanup(info)
