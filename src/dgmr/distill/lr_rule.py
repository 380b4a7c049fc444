"""The peak learning rate a run trains with, and why (recorded in run_config.json and summary.json).

An explicit ``lr`` wins. Otherwise the paper's rule gives ``base_lr x global_batch / 256``,
written for students that start far from their teacher (weights-only pruning). The ``fit``
rule (the default) scales it to where the student starts, in proportion to the student's
step-0 ``val_loss`` relative to the teacher's feature scale (the loss of the best constant
prediction of the teacher's features, :attr:`~.validation.ValLoss.scale`): unscaled at
:data:`FULL_AT` and above, never below :data:`FLOOR` of it. AdamW moves every weight by about
the learning rate per step whatever the gradient's size; near the teacher the gradient is
mostly noise, and the loss the noise holds the student at grows in proportion to the rate, so
a student that already reproduces its teacher (a calibrated prune) needs a rate in proportion
to the loss it has left. Measured on the demo's students (docs/distill.md): weights-only
prunes start at 0.17-0.56 of the scale, calibrated ones at 0.001-0.007; the paper's rate
raised a calibrated student's val_loss up to 5.6x, the fitted one keeps it within 1.1x.
"""
from __future__ import annotations

import math
from typing import Any

from .settings import DistillSettings
from .validation import ValLoss

FULL_AT = 0.05  # relative step-0 loss from which the paper's lr is used unscaled
FLOOR = 0.01  # the smallest fraction of the paper's lr the fit rule picks


def paper_lr(settings: DistillSettings, global_batch: int) -> float:
    return settings.base_lr * global_batch / 256


def choose_peak_lr(settings: DistillSettings, global_batch: int, start: ValLoss | None) -> tuple[float, dict[str, Any]]:
    """(peak lr, the record of the choice: rule, inputs, factor and a sentence saying why)."""
    paper = paper_lr(settings, global_batch)
    measured = start is not None and bool(start.scale) and math.isfinite(start.loss)
    relative = start.loss / start.scale if measured else None
    seen = {"step0_val_loss": start.loss, "teacher_scale": start.scale, "relative_loss": relative} if measured else {}
    if settings.lr is not None:
        return settings.lr, {"rule": "lr", "peak_lr": settings.lr, **seen,
                             "why": "given (lr overrides base_lr and lr_rule)"}
    record: dict[str, Any] = {"rule": settings.lr_rule, "paper_lr": paper, "base_lr": settings.base_lr,
                              "global_batch": global_batch, **seen}
    if settings.lr_rule == "paper":
        return paper, {**record, "peak_lr": paper, "why": "the paper's: base_lr x global_batch / 256"}
    if relative is None:
        return paper, {**record, "peak_lr": paper, "why": "no held-out images to measure the start on: the paper's lr"}
    factor = min(1.0, max(FLOOR, relative / FULL_AT))
    peak = paper * factor
    why = (f"step-0 val_loss {start.loss:.4g} is {relative:.3g} of the teacher's feature scale {start.scale:.4g}; "
           + (f"at or above {FULL_AT:g}: the paper's lr" if factor == 1.0 else
              f"below {FULL_AT:g}: the paper's lr x {relative:.3g} / {FULL_AT:g}"
              + (f", floored at {FLOOR:g}" if factor == FLOOR else "")))
    return peak, {**record, "peak_lr": peak, "factor": factor, "full_at": FULL_AT, "floor": FLOOR, "why": why}
