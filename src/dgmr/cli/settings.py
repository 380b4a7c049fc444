"""Flags generated from a typed settings dataclass, so a setting and its default are declared once.

A field's ``metadata`` documents it: ``help`` (the CLI appends the default), optionally
``group`` (the ``--help`` section), ``flag`` (the flag's name when it is not the field's),
``choices`` and ``metavar``. Every generated flag defaults to None: a flag not given leaves
the setting's default (or a config file's value) in place, and :func:`given` collects
the flags that were.
"""
from __future__ import annotations

import argparse
import dataclasses
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


def flag(f: dataclasses.Field) -> str:
    """The flag of setting ``f``: its metadata's, else ``--name`` (``--no-name`` for a
    boolean that is on by default)."""
    name = f.name.replace("_", "-")
    return f.metadata.get("flag", f"--no-{name}" if f.default is True else f"--{name}")


def add_setting(g: argparse._ActionsContainer, f: dataclasses.Field, hint: Any) -> None:
    """One flag for setting ``f``. Booleans are switches away from their default (``--fsdp``,
    ``--no-tensorboard``); a None default is explained by the help text itself."""
    help_ = f.metadata["help"]
    if hint is bool:
        if f.default:
            g.add_argument(flag(f), dest=f.name, action="store_false", default=None,
                           help=f"{help_} (on by default; this flag turns it off)".replace("%", "%%"))
        else:
            g.add_argument(flag(f), dest=f.name, action="store_true", default=None, help=help_.replace("%", "%%"))
        return
    if f.default is not None:
        help_ += f" (default: {_shown(f.default)})"
    g.add_argument(flag(f), dest=f.name, type=_argument_type(hint), default=None, choices=f.metadata.get("choices"),
                   metavar=f.metadata.get("metavar"), help=help_.replace("%", "%%"))


def add_settings(p: argparse.ArgumentParser, cls: type, group: str | None = None,
                 groups: dict[str, argparse._ArgumentGroup] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """Every field of dataclass ``cls`` as a flag, in field order, in the group its metadata
    names (or ``group``), reusing ``groups`` already made; returns the groups by title."""
    hints = typing.get_type_hints(cls)
    groups = dict(groups or {})
    for f in dataclasses.fields(cls):
        title = f.metadata.get("group", group)
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        add_setting(groups[title], f, hints[f.name])
    return groups


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of ``cls`` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def given_flags(args: argparse.Namespace, cls: type) -> list[str]:
    """The flags of the settings of ``cls`` that were given on the command line."""
    return [flag(f) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None]
