"""The ``distill`` sub-command (see :func:`dgmr.distill.distill`).

Its setting flags are generated (:mod:`.settings`) from the fields of
:class:`dgmr.distill.DistillSettings` (names, types, help, ``--help`` groups), so a setting
and its default are declared once.
Every setting flag defaults to None: a flag not given leaves the ``--config`` file's value
(or the setting's default) in place.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from .settings import add_settings


def _distill(args: argparse.Namespace) -> dict[str, Any]:
    from ..core.errors import DgmrError
    from ..distill import DistillSettings, distill

    if not args.resume and (args.teacher is None or args.student is None or args.data is None):
        raise DgmrError("give --teacher, --student and --data (or --resume an existing run)")
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillSettings)}
    result = distill(args.teacher, args.student, args.data, args.out, val_data=args.val_data, config=args.config,
                     resume=args.resume, overwrite=args.overwrite, progress=not args.json and not args.no_progress,
                     **settings)
    return result if int(os.environ.get("RANK", "0")) == 0 else None  # under torchrun: rank 0 reports


def register(sub: argparse._SubParsersAction) -> None:
    from ..distill.settings import HARDWARE

    p = sub.add_parser(
        "distill", help="recover a pruned model by feature distillation from the original (no labels)",
        description="Train the pruned STUDENT to reproduce the TEACHER's final features (pooled/CLS + patch "
                    "tokens, MSE 1:1) on unlabeled images, measuring the same loss on held-out images (val_loss) "
                    "from step 0. Runs alone or under torchrun (DDP, or FSDP2 with --fsdp). Settings: defaults "
                    "(the paper's recipe, its lr fitted to the student's start) <- --config FILE <- flags. The run "
                    "directory gets metrics.jsonl, checkpoint.pt, and the student with the lowest val_loss "
                    "(--export) in dgmr prune's format.")
    p.add_argument("--teacher", help="the original model: timm:NAME, open_clip:ARCH[:TAG], hf:REPO_OR_DIR or a dgmr dir")
    p.add_argument("--student", help="the pruned model: a dgmr directory (or a model spec of the same family)")
    p.add_argument("--data", help="a directory of images (any nesting), a .txt list of image paths, or WebDataset "
                                  "shards like 'shards-{0000..0099}.tar'")
    p.add_argument("--val-data", help="held-out images for val_loss, in any form --data takes (default: a seeded "
                                      "slice of --data, --val-fraction, never trained on)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="YAML/JSON file of settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    from ..distill import DistillSettings

    groups = add_settings(p, DistillSettings)
    groups[HARDWARE].add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_distill)
