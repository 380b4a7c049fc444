"""The ``distill`` sub-command (see :func:`dgmr.distill.distill`)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from .commands import model_kwargs_arg




def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}") from None
    return a, b


def _distill(args: argparse.Namespace) -> dict[str, Any]:
    from .distill import distill
    from .errors import DgmrError

    if not args.resume and (args.teacher is None or args.student is None or args.data is None):
        raise DgmrError("give --teacher, --student and --data (or --resume an existing run)")
    settings = {name: getattr(args, name) for name in SETTING_FLAGS}
    if args.random_init:
        settings["random_init"] = True
    if args.fsdp:
        settings["fsdp"] = True
    if args.no_tensorboard:
        settings["tensorboard"] = False
    result = distill(args.teacher, args.student, args.data, args.out, config=args.config, resume=args.resume,
                     overwrite=args.overwrite, progress=not args.json and not args.no_progress, **settings)
    return result if int(os.environ.get("RANK", "0")) == 0 else None  # under torchrun: rank 0 reports


# flags passed straight through as DistillSettings fields (None = not given)
SETTING_FLAGS = ("epochs", "steps", "batch_size", "accum", "base_lr", "lr", "min_lr", "warmup_steps",
                 "warmup_fraction", "weight_decay", "weight_decay_end", "betas", "clip_grad", "ema", "loss",
                 "pooled_weight", "tokens_weight", "crop_scale", "image_size", "seed", "workers", "precision",
                 "device", "save_every", "log_every", "model_kwargs")


def register(sub: argparse._SubParsersAction) -> None:
    from .distill import LOSSES, PRECISIONS

    p = sub.add_parser(
        "distill", help="recover a pruned model by feature distillation from the original (no labels)",
        description="Train the pruned STUDENT to reproduce the TEACHER's final features (pooled/CLS + patch "
                    "tokens, MSE 1:1) on unlabeled images. Runs alone or under torchrun (DDP, or FSDP2 with "
                    "--fsdp). Settings: defaults (the paper's recipe) <- --config FILE <- flags. The run "
                    "directory gets metrics.jsonl, checkpoint.pt, and the final student in dgmr prune's format.")
    p.add_argument("--teacher", help="the original model: timm:NAME, open_clip:ARCH[:TAG], hf:REPO_OR_DIR or a dgmr dir")
    p.add_argument("--student", help="the pruned model: a dgmr directory (or a model spec of the same family)")
    p.add_argument("--data", help="a directory of images (any nesting), a .txt list of image paths, or WebDataset "
                                  "shards like 'shards-{0000..0099}.tar'")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="YAML/JSON file of settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (default 10)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=None, help="images per process per micro-batch (default 64)")
    g.add_argument("--accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--base-lr", type=float, default=None, help="lr = base_lr x global_batch / 256 (default 1e-4)")
    g.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --base-lr)")
    g.add_argument("--min-lr", type=float, default=None, help="final lr of the cosine (default 1e-6)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 10%% of the run)")
    g.add_argument("--warmup-fraction", type=float, default=None, help="warmup as a fraction of the run (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=None, help="start of the weight-decay cosine (default 0.04)")
    g.add_argument("--weight-decay-end", type=float, default=None, help="end of the weight-decay cosine (default 0.2)")
    g.add_argument("--betas", type=_pair, default=None, help="AdamW betas (default 0.9,0.95)")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the global grad norm to this")
    g.add_argument("--ema", type=float, default=None, help="keep and export an EMA of the student (e.g. 0.997)")
    g = p.add_argument_group("loss and data")
    g.add_argument("--loss", choices=LOSSES, default=None, help="feature loss (default mse)")
    g.add_argument("--pooled-weight", type=float, default=None, help="weight of the pooled/CLS loss (default 1)")
    g.add_argument("--tokens-weight", type=float, default=None, help="weight of the patch-token loss (default 1)")
    g.add_argument("--crop-scale", type=_pair, default=None, help="RandomResizedCrop scale (default 0.2,1)")
    g.add_argument("--image-size", type=int, default=None, help="training resolution (default: the teacher's)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers per process")
    g.add_argument("--seed", type=int, default=None, help="seed for data order, crops and init (default 0)")
    g = p.add_argument_group("hardware and output")
    g.add_argument("--precision", choices=PRECISIONS, default=None, help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--fsdp", action="store_true", help="shard the student with FSDP2 per block (under torchrun)")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default 1000; 0: at the end)")
    g.add_argument("--log-every", type=int, default=None, help="metrics line every N steps (default 10)")
    g.add_argument("--no-tensorboard", action="store_true", help="do not log to TensorBoard")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--random-init", action="store_true",
                   help="build teacher/student given as specs with random weights (no download; for tests)")
    g.add_argument("--model-kwargs", type=model_kwargs_arg, default=None, metavar="JSON",
                   help="architecture arguments for teacher/student specs, e.g. '{\"img_size\": 64}'")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_distill)
