"""Typed settings: one dataclass field per setting, with its default and its documentation.

A command's settings are a dataclass whose fields are at once the CLI flags
(:mod:`dgmr.cli.settings` generates them), the keys of a config file and the keywords of the
Python function, so a setting and its default are declared once. :func:`setting` makes a
field; its metadata documents it for the CLI:

* ``help``: what the setting does (the CLI appends the default);
* ``group``: the ``--help`` section;
* ``flag``: the flag's name when it is not ``--field-name`` (``--no-field-name`` for a
  boolean that is on by default);
* ``off``: for a boolean that is on by default, what its ``--no-...`` flag turns off;
* ``choices`` (a sequence, or a callable returning one: a registry read when the parser is
  built), ``metavar``, ``type`` (an argparse type overriding the annotation's);
* ``required``: the flag must be given; ``exclusive``: flags sharing this name exclude
  each other; ``cli=False``: a keyword of the Python function only, no flag.

:func:`coerce` gives a value its setting's type (a YAML file's ``1e-4`` is text to PyYAML)
and :func:`unknown_keyword` words a misspelt keyword as Python does.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from .errors import DgmrError


def setting(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field for one setting (see the module docstring for ``cli``'s keys)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help, **cli})
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def unknown_keyword(function: str, given: Any, *allowed: type | set[str]) -> None:
    """Raise Python's own TypeError for a keyword none of ``allowed`` (dataclasses or name sets) has."""
    known: set[str] = set()
    for a in allowed:
        known |= a if isinstance(a, set) else names(a)
    extra = sorted(set(given) - known)
    if extra:
        raise TypeError(f"{function}() got an unexpected keyword argument {extra[0]!r}")


def coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the setting's type: a YAML/JSON config may hold ``1e-4`` as text (PyYAML
    reads it so) or ``2.0`` for an int; anything else is one error naming the setting."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    kind = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) not in (
        tuple, list) else hint
    origin = typing.get_origin(kind)
    try:
        if origin is tuple:
            if isinstance(value, (str, bytes)) or len(value) != len(typing.get_args(kind)):
                raise ValueError
            return tuple(coerce(name, a, v) for a, v in zip(typing.get_args(kind), value))
        if origin is list and not isinstance(value, (str, bytes)):
            return [coerce(name, typing.get_args(kind)[0], v) for v in value]
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
        f"{len(typing.get_args(kind))} numbers" if origin is tuple else "a list" if origin is list else str(kind))
    raise DgmrError(f"setting {name} must be {what}, got {value!r}")
