"""The ``distill`` sub-command (see :func:`dgmr.distill.distill`).

Its setting flags are generated from the fields of :class:`dgmr.distill.DistillSettings`
(names, types, help, ``--help`` groups), so a setting and its default are declared once.
Every setting flag defaults to None: a flag not given leaves the ``--config`` file's value
(or the setting's default) in place.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any

from .args import model_kwargs_arg


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}") from None
    return a, b


def _distill(args: argparse.Namespace) -> dict[str, Any]:
    from ..distill import DistillSettings, distill
    from ..errors import DgmrError

    if not args.resume and (args.teacher is None or args.student is None or args.data is None):
        raise DgmrError("give --teacher, --student and --data (or --resume an existing run)")
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillSettings)}
    result = distill(args.teacher, args.student, args.data, args.out, config=args.config, resume=args.resume,
                     overwrite=args.overwrite, progress=not args.json and not args.no_progress, **settings)
    return result if int(os.environ.get("RANK", "0")) == 0 else None  # under torchrun: rank 0 reports


def _argument_type(hint: Any) -> Any:
    """The argparse ``type`` for a setting's annotation (``X | None`` parses as X)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is tuple:
        return _pair
    if origin is dict:
        return model_kwargs_arg
    if hint in (int, float, str):
        return hint
    raise TypeError(f"no command-line type for a setting of type {hint}")


def _shown(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_setting(g: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any) -> None:
    """One flag for setting ``f``. Booleans are switches away from their default (``--fsdp``,
    ``--no-tensorboard``); a None default is explained by the help text itself."""
    flag = "--" + f.name.replace("_", "-")
    help_ = f.metadata["help"]
    if hint is bool:
        if f.default:
            g.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false", default=None,
                           help=f"{help_} (on by default; this flag turns it off)".replace("%", "%%"))
        else:
            g.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_.replace("%", "%%"))
        return
    if f.default is not None:
        help_ += f" (default: {_shown(f.default)})"
    g.add_argument(flag, dest=f.name, type=_argument_type(hint), default=None, choices=f.metadata.get("choices"),
                   metavar=f.metadata.get("metavar"), help=help_.replace("%", "%%"))


def _add_settings(p: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """Every DistillSettings field as a flag, in field order, in the group its metadata names."""
    from ..distill import DistillSettings

    hints = typing.get_type_hints(DistillSettings)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(DistillSettings):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        _add_setting(groups[group], f, hints[f.name])
    return groups


def register(sub: argparse._SubParsersAction) -> None:
    from ..distill.settings import HARDWARE

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
    groups = _add_settings(p)
    groups[HARDWARE].add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_distill)
