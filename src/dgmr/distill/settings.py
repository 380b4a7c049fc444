"""Distillation settings: one typed dataclass whose fields are the CLI flags, the config
file keys and the ``distill(**settings)`` keywords; defaults live here only.

Each field is a :func:`dgmr.core.settings.setting`: its metadata documents it for the CLI
(``dgmr distill`` builds its flags from these fields, :mod:`dgmr.cli.settings`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.dtypes import PRECISIONS
from ..core.errors import DgmrError, first_line
from ..core.settings import coerce, setting
from ..io.files import read_text_file

LOSSES = ("mse", "cosine")
EXPORTS = ("best", "last")
LR_RULES = ("fit", "paper")
COMPILE_MODES = ("auto", "on", "off", "max-autotune")
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
# settings that may change when resuming (they do not change what is trained)
RESUME_MUTABLE = {"workers", "log_every", "save_every", "tensorboard", "device", "compile", "attention",
                  "unreadable_warn", "export"}
DEFAULT_EPOCHS = 10  # the paper's run length, when neither epochs nor steps is set

SCHEDULE, LOSS_AND_DATA, HARDWARE = "schedule", "loss and data", "hardware and output"
HELD_OUT = "held-out loss, export and stopping"


@dataclass
class DistillSettings:
    """Every training setting; defaults follow the paper's recipe (docs/method.md, "Distillation recipe")."""

    epochs: float | None = setting(None, f"passes over the data ({DEFAULT_EPOCHS} when neither epochs nor steps is "
                                         "set)", group=SCHEDULE)
    steps: int | None = setting(None, "optimizer steps (overrides epochs)", group=SCHEDULE)
    batch_size: int = setting(64, "images per process per micro-batch", group=SCHEDULE)
    accum: int = setting(1, "gradient accumulation: micro-batches per optimizer step", group=SCHEDULE)
    base_lr: float = setting(1e-4, "the paper's peak lr is base_lr x global_batch / 256", group=SCHEDULE)
    lr: float | None = setting(None, "absolute peak lr (overrides base_lr and lr_rule)", group=SCHEDULE)
    lr_rule: str = setting("fit", "peak lr without --lr: fit (the paper's, scaled down for a student whose step-0 "
                                  "val_loss is already small next to the teacher's feature variance; "
                                  "docs/distill.md) or paper (the paper's, unscaled)", choices=LR_RULES,
                           group=SCHEDULE)
    min_lr: float = setting(1e-6, "final lr of the cosine", group=SCHEDULE)
    warmup_steps: int | None = setting(None, "linear warmup steps (unset: warmup_fraction of the run)", group=SCHEDULE)
    warmup_fraction: float = setting(0.1, "warmup as a fraction of the run, if warmup_steps is unset", group=SCHEDULE)
    weight_decay: float = setting(0.04, "start of the weight-decay cosine", group=SCHEDULE)
    weight_decay_end: float = setting(0.2, "end of the weight-decay cosine", group=SCHEDULE)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas, as b1,b2", group=SCHEDULE)
    clip_grad: float | None = setting(None, "clip the global grad norm to this", group=SCHEDULE)
    ema: float | None = setting(None, "keep an EMA of the student with this decay (e.g. 0.997) and export it",
                                group=SCHEDULE)
    loss: str = setting("mse", "feature loss", choices=LOSSES, group=LOSS_AND_DATA)
    pooled_weight: float = setting(1.0, "weight of the pooled/CLS loss", group=LOSS_AND_DATA)
    tokens_weight: float = setting(1.0, "weight of the patch-token loss", group=LOSS_AND_DATA)
    crop_scale: tuple[float, float] = setting((0.2, 1.0), "RandomResizedCrop scale, as lo,hi", group=LOSS_AND_DATA)
    image_size: int | None = setting(None, "training resolution (unset: the teacher's)", group=LOSS_AND_DATA)
    seed: int = setting(0, "seed for data order, crops and init (and the weights of --random-init models)",
                        group=LOSS_AND_DATA)
    unreadable_warn: float = setting(0.1, "warn (on stderr and in the summary) when more than this fraction of the "
                                          "image reads failed (corrupt or unreadable files)", group=LOSS_AND_DATA)
    workers: int | None = setting(None, "DataLoader workers per process (unset: from the CPU count; 0 for in-memory "
                                        "data)", group=LOSS_AND_DATA)
    val_fraction: float = setting(0.02, "fraction of --data held out (a seeded slice, never trained on) for "
                                        "val_loss when --val-data is not given; 0: no held-out images, no "
                                        "evaluations", group=HELD_OUT)
    val_images: int = setting(512, "at most this many held-out images (a seeded choice of --val-data when it "
                                   "holds more)", group=HELD_OUT)
    eval_every: int | None = setting(None, "val_loss every N steps, besides step 0 and the last step (unset: 20 "
                                           "evaluations over the run)", group=HELD_OUT)
    export: str = setting("best", "the weights exported: best (lowest val_loss) or last", choices=EXPORTS,
                          group=HELD_OUT)
    early_stop: int | None = setting(None, "stop after this many evaluations in a row without a relative val_loss "
                                           "improvement of min_delta (off when unset)", metavar="PATIENCE",
                                     group=HELD_OUT)
    min_delta: float = setting(0.01, "the relative val_loss improvement early_stop waits for", group=HELD_OUT)
    target_val_loss: float | None = setting(None, "stop once val_loss is at or below this", group=HELD_OUT)
    precision: str = setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=PRECISIONS, group=HARDWARE)
    device: str | None = setting(None, "cpu or cuda (unset: cuda when available)", group=HARDWARE)
    compile: str = setting("auto", "torch.compile the teacher forward and the student forward/backward (auto: on CUDA "
                                   "without FSDP; max-autotune: also tune the GEMMs, minutes of compiling; a failed "
                                   "compile falls back to eager)", choices=COMPILE_MODES, group=HARDWARE)
    attention: str = setting("auto", "scaled-dot-product attention backend tried first (auto: PyTorch's choice)",
                             choices=ATTENTION_BACKENDS, group=HARDWARE)
    fsdp: bool = setting(False, "shard the student with FSDP2 per block instead of DDP (under torchrun)", group=HARDWARE)
    save_every: int = setting(1000, "checkpoint every N steps; 0: only at the end", group=HARDWARE)
    log_every: int = setting(10, "metrics line every N steps", group=HARDWARE)
    tensorboard: bool = setting(True, "also log to TensorBoard when the package is installed", group=HARDWARE,
                                off="do not write TensorBoard logs (metrics.jsonl is written either way)")
    random_init: bool = setting(False, "build teacher/student given as specs with random weights (no download; for "
                                       "tests)", group=HARDWARE)
    model_kwargs: dict[str, Any] | None = setting(None, "architecture arguments for teacher/student specs, e.g. "
                                                        "'{\"img_size\": 64}'", metavar="JSON", group=HARDWARE)

    @classmethod
    def resolve(cls, config: str | os.PathLike | dict[str, Any] | None = None, **overrides: Any) -> "DistillSettings":
        """Defaults <- config file (YAML/JSON) or dict <- ``overrides`` (None values ignored)."""
        values: dict[str, Any] = {}
        if config is not None:
            values.update(read_config_file(config) if not isinstance(config, dict) else config)
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise DgmrError(f"unknown distill setting {unknown[0]!r}; known: {', '.join(sorted(names))}")
        hints = typing.get_type_hints(cls)
        values = {k: coerce(k, hints[k], v) for k, v in values.items()}
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
        if self.attention not in ATTENTION_BACKENDS:
            raise DgmrError(f"unknown attention backend {self.attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        if self.compile not in COMPILE_MODES:
            raise DgmrError(f"unknown compile mode {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        if self.precision not in PRECISIONS:
            raise DgmrError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise DgmrError(f"ema must be in (0, 1), got {self.ema}")
        if not 0 <= self.warmup_fraction < 1:
            raise DgmrError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise DgmrError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 <= self.unreadable_warn <= 1:
            raise DgmrError(f"unreadable_warn must be a fraction in [0, 1], got {self.unreadable_warn}")
        if self.workers is not None and self.workers < 0:
            raise DgmrError(f"workers must be >= 0, got {self.workers}")
        self._validate_held_out()

    def _validate_held_out(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise DgmrError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("val_images", "eval_every", "early_stop"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DgmrError(f"{name} must be >= 1, got {value}")
        if not 0 <= self.min_delta < 1:
            raise DgmrError(f"min_delta must be in [0, 1), got {self.min_delta}")
        if self.target_val_loss is not None and not self.target_val_loss >= 0:
            raise DgmrError(f"target_val_loss must be >= 0, got {self.target_val_loss}")
        if self.export not in EXPORTS:
            raise DgmrError(f"unknown export {self.export!r}; choose {' or '.join(EXPORTS)}")
        if self.lr_rule not in LR_RULES:
            raise DgmrError(f"unknown lr_rule {self.lr_rule!r}; choose {' or '.join(LR_RULES)}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    text = read_text_file(path, "config file")  # a regular file of bounded size: not /dev/zero
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            value = yaml.safe_load(text)
        else:
            value = json.loads(text)
    except Exception as e:  # yaml.YAMLError / ValueError: the file is the user's
        raise DgmrError(f"config file {path} does not parse: {first_line(e)}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DgmrError(f"config file {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


