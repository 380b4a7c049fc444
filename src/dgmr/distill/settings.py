"""Distillation settings: one typed dataclass whose fields are the CLI flags, the config
file keys and the ``distill(**settings)`` keywords; defaults live here only.

Each field's ``metadata`` documents it for the CLI (``dgmr distill`` builds its flags from
these fields): ``help`` (what the setting does; the CLI appends the default), ``group`` (the
``--help`` section) and, where a flag needs them, ``choices`` and ``metavar``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DgmrError, first_line

LOSSES = ("mse", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_MODES = ("auto", "on", "off", "max-autotune")
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
# settings that may change when resuming (they do not change what is trained)
RESUME_MUTABLE = {"workers", "log_every", "save_every", "tensorboard", "device", "compile", "attention",
                  "unreadable_warn"}
DEFAULT_EPOCHS = 10  # the paper's run length, when neither epochs nor steps is set

SCHEDULE, LOSS_AND_DATA, HARDWARE = "schedule", "loss and data", "hardware and output"


def _setting(default: Any, group: str, help: str, **cli: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **cli})


def _typed(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the setting's type: a YAML/JSON config may hold ``1e-4`` as text (PyYAML
    reads it so) or ``2.0`` for an int; anything else is one error naming the setting."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    kind = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not tuple else hint
    origin = typing.get_origin(kind)
    try:
        if origin is tuple:
            if isinstance(value, (str, bytes)) or len(value) != len(typing.get_args(kind)):
                raise ValueError
            return tuple(_typed(name, a, v) for a, v in zip(typing.get_args(kind), value))
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is int and not isinstance(value, bool):
            f = float(value)
            if f.is_integer():
                return int(f)
            raise ValueError
        if kind is str and isinstance(value, str):
            return value
        if origin is dict and isinstance(value, dict):
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    what = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(kind) or (
        f"{len(typing.get_args(kind))} numbers" if origin is tuple else str(kind))
    raise DgmrError(f"setting {name} must be {what}, got {value!r}")


@dataclass
class DistillSettings:
    """Every training setting; defaults follow the paper's recipe (docs/method.md, "Distillation recipe")."""

    epochs: float | None = _setting(None, SCHEDULE, f"passes over the data ({DEFAULT_EPOCHS} when neither epochs "
                                                    "nor steps is set)")
    steps: int | None = _setting(None, SCHEDULE, "optimizer steps (overrides epochs)")
    batch_size: int = _setting(64, SCHEDULE, "images per process per micro-batch")
    accum: int = _setting(1, SCHEDULE, "gradient accumulation: micro-batches per optimizer step")
    base_lr: float = _setting(1e-4, SCHEDULE, "peak lr = base_lr x global_batch / 256")
    lr: float | None = _setting(None, SCHEDULE, "absolute peak lr (overrides base_lr)")
    min_lr: float = _setting(1e-6, SCHEDULE, "final lr of the cosine")
    warmup_steps: int | None = _setting(None, SCHEDULE, "linear warmup steps (unset: warmup_fraction of the run)")
    warmup_fraction: float = _setting(0.1, SCHEDULE, "warmup as a fraction of the run, if warmup_steps is unset")
    weight_decay: float = _setting(0.04, SCHEDULE, "start of the weight-decay cosine")
    weight_decay_end: float = _setting(0.2, SCHEDULE, "end of the weight-decay cosine")
    betas: tuple[float, float] = _setting((0.9, 0.95), SCHEDULE, "AdamW betas, as b1,b2")
    clip_grad: float | None = _setting(None, SCHEDULE, "clip the global grad norm to this")
    ema: float | None = _setting(None, SCHEDULE, "keep an EMA of the student with this decay (e.g. 0.997) "
                                                 "and export it")
    loss: str = _setting("mse", LOSS_AND_DATA, "feature loss", choices=LOSSES)
    pooled_weight: float = _setting(1.0, LOSS_AND_DATA, "weight of the pooled/CLS loss")
    tokens_weight: float = _setting(1.0, LOSS_AND_DATA, "weight of the patch-token loss")
    crop_scale: tuple[float, float] = _setting((0.2, 1.0), LOSS_AND_DATA, "RandomResizedCrop scale, as lo,hi")
    image_size: int | None = _setting(None, LOSS_AND_DATA, "training resolution (unset: the teacher's)")
    seed: int = _setting(0, LOSS_AND_DATA, "seed for data order, crops and init (and the weights of --random-init "
                                           "models)")
    unreadable_warn: float = _setting(0.1, LOSS_AND_DATA, "warn (on stderr and in the summary) when more than "
                                      "this fraction of the image reads failed (corrupt or unreadable files)")
    workers: int | None = _setting(None, LOSS_AND_DATA, "DataLoader workers per process (unset: from the CPU "
                                                        "count; 0 for in-memory data)")
    precision: str = _setting("auto", HARDWARE, "auto: bf16 autocast on GPU, fp32 on CPU", choices=PRECISIONS)
    device: str | None = _setting(None, HARDWARE, "cpu or cuda (unset: cuda when available)")
    compile: str = _setting("auto", HARDWARE, "torch.compile the teacher forward and the student forward/backward "
                                              "(auto: on CUDA without FSDP; max-autotune: also tune the GEMMs, "
                                              "minutes of compiling; a failed compile falls back to eager)",
                            choices=COMPILE_MODES)
    attention: str = _setting("auto", HARDWARE, "scaled-dot-product attention backend tried first (auto: PyTorch's "
                              "choice)", choices=ATTENTION_BACKENDS)
    fsdp: bool = _setting(False, HARDWARE, "shard the student with FSDP2 per block instead of DDP (under torchrun)")
    save_every: int = _setting(1000, HARDWARE, "checkpoint every N steps; 0: only at the end")
    log_every: int = _setting(10, HARDWARE, "metrics line every N steps")
    tensorboard: bool = _setting(True, HARDWARE, "also log to TensorBoard when the package is installed")
    random_init: bool = _setting(False, HARDWARE, "build teacher/student given as specs with random weights "
                                                  "(no download; for tests)")
    model_kwargs: dict[str, Any] | None = _setting(None, HARDWARE, "architecture arguments for teacher/student "
                                                                   "specs, e.g. '{\"img_size\": 64}'", metavar="JSON")

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
        values = {k: _typed(k, hints[k], v) for k, v in values.items()}
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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    from ..schema import read_text_file

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


