"""Flags generated from a typed settings dataclass, so a setting and its default are declared once.

A field's ``metadata`` documents it (see :mod:`dgmr.core.settings`): ``help`` (the CLI
appends the default), ``group``, ``flag``, ``off``, ``choices``, ``metavar``, ``type``,
``required``, ``exclusive`` and ``cli`` (False: a Python keyword only, no flag). Every generated flag defaults to None: a flag not given
leaves the setting's default (or a config file's value) in place, and :func:`given`
collects the flags that were.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from .args import finite_number, model_kwargs_arg, number_list


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}") from None
    return a, b


def _unwrap(hint: Any) -> Any:
    """``X | None`` -> X."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _argument_type(hint: Any) -> Any:
    """The argparse ``type`` for a setting's annotation (``X | None`` parses as X)."""
    hint = _unwrap(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        return _pair
    if origin is list:
        item = typing.get_args(hint)[0]
        return number_list(item, "integers" if item is int else "numbers")
    if origin is dict:
        return model_kwargs_arg
    if hint in (int, float, str):
        return hint
    raise TypeError(f"no command-line type for a setting of type {hint}")


def _shown(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, (tuple, list)):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def flag(f: dataclasses.Field) -> str:
    """The flag of setting ``f``: its metadata's, else ``--name`` (``--no-name`` for a
    boolean that is on by default)."""
    name = f.name.replace("_", "-")
    return f.metadata.get("flag", f"--no-{name}" if f.default is True else f"--{name}")


def _help(text: str) -> str:
    return text.replace("%", "%%")


def add_setting(g: argparse._ActionsContainer, f: dataclasses.Field, hint: Any) -> None:
    """One flag for setting ``f``. Booleans are switches away from their default (``--fsdp``,
    ``--no-tensorboard``, whose help says what it turns off); a None default is explained by
    the help text itself; a required flag says so."""
    meta = f.metadata
    if hint is bool:
        if f.default:
            off = meta.get("off") or f"turn off: {meta['help']}"
            g.add_argument(flag(f), dest=f.name, action="store_false", default=None, help=_help(off))
        else:
            g.add_argument(flag(f), dest=f.name, action="store_true", default=None, help=_help(meta["help"]))
        return
    help_ = meta["help"]
    default = _default(f)
    if meta.get("required"):
        help_ += " (required)"
    elif default is not None:
        help_ += f" (default: {_shown(default)})"
    choices = meta.get("choices")
    kind = meta.get("type") or _argument_type(hint)
    if kind is float:  # float() takes "inf" and "nan": every float setting must be finite
        kind = finite_number(flag(f))
    g.add_argument(flag(f), dest=f.name, type=kind, default=None,
                   choices=choices() if callable(choices) else choices, metavar=meta.get("metavar"),
                   required=bool(meta.get("required")), help=_help(help_))


def add_settings(p: argparse.ArgumentParser, cls: type, group: str | None = None,
                 groups: dict[str, argparse._ArgumentGroup] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """Every field of dataclass ``cls`` as a flag, in field order, in the group its metadata
    names (or ``group``; None: the parser's options), reusing ``groups`` already made; flags
    with the same ``exclusive`` name go into one mutually exclusive group. Returns the groups
    by title."""
    hints = typing.get_type_hints(cls)
    groups = dict(groups or {})
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):  # a Python keyword only (e.g. progress: the CLI has --json)
            continue
        title = f.metadata.get("group", group)
        if title not in groups:
            groups[title] = p.add_argument_group(title) if title is not None else p
        target: argparse._ActionsContainer = groups[title]
        name = f.metadata.get("exclusive")
        if name:
            if name not in exclusive:
                exclusive[name] = groups[title].add_mutually_exclusive_group()
            target = exclusive[name]
        shared = p._option_string_actions.get(flag(f))
        if shared is not None:  # one flag for a setting two dataclasses share (eval linear's --seed)
            if _default(f) != _shared_default(p, shared):
                raise ValueError(f"{flag(f)}: {cls.__name__} and another settings class differ in its default")
            continue
        add_setting(target, f, hints[f.name])
        p._option_string_actions[flag(f)].dgmr_default = _default(f)  # type: ignore[attr-defined]
    return groups


def _shared_default(p: argparse.ArgumentParser, action: argparse.Action) -> Any:
    return getattr(action, "dgmr_default", dataclasses.MISSING)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of ``cls`` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def given_flags(args: argparse.Namespace, cls: type) -> list[str]:
    """The flags of the settings of ``cls`` that were given on the command line."""
    return [flag(f) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None]
