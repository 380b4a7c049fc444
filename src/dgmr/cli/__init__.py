"""``dgmr`` command line: a thin layer over the library functions.

Each command module exposes ``register(subparsers)`` that adds its sub-parser with a
``func(args) -> dict`` default; :func:`main` prints the dict (``--json``) or a summary and
turns :class:`DgmrError` into one ``dgmr: error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import logging
import signal
import sys
import warnings
from typing import Any, Sequence

from ..core.errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_TERMINATED,
    DgmrError,
    Preempted,
    Terminated,
)
from ..core.signals import STOP_SIGNALS, handling
from ..core.version import __version__

# modules that add sub-commands (each has register(subparsers))
COMMAND_MODULES = ("dgmr.cli.prune", "dgmr.cli.imports", "dgmr.cli.distill", "dgmr.cli.eval", "dgmr.cli.card",
                   "dgmr.cli.demo")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgmr",
        description="Diversity-Guided MLP Reduction: prune the MLPs of a vision transformer, "
                    "distill it back, evaluate it. MODEL is timm:NAME, open_clip:ARCH[:TAG], "
                    "hf:REPO_OR_DIR, or a directory dgmr wrote.",
    )
    p.add_argument("--version", action="version", version=f"dgmr {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _remember_parsers(p)
    return p


def _remember_parsers(p: argparse.ArgumentParser) -> None:
    """Every sub-command's parser records itself as ``args.parser`` (see :func:`parse`), and every
    required option says so in its help."""
    for action in p._actions:
        if action.required and action.option_strings and action.help and "(required)" not in action.help:
            action.help += " (required)"
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                sp.set_defaults(parser=sp)
                _remember_parsers(sp)


def format_number(v: float) -> str:
    """A float for the printed summary: four decimals, or three significant digits where four
    decimals would hide it (a peak lr of 6.25e-06 is not 0.0000)."""
    if v != 0 and abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.4f}"


def print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    for k, v in result.items():
        if isinstance(v, float):
            v = format_number(v)
        elif isinstance(v, int) and abs(v) >= 10_000:
            v = f"{v:,}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        print(f"{k:>20}: {v}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse(parser, argv)  # inside: an argument type may raise DgmrError (cli.args.finite_number)
        with _sigterm_raises(), _one_line_warnings():
            result = args.func(args)
    except Preempted as e:
        print(f"dgmr: stopped: {_printable(e)}", file=sys.stderr)
        return EXIT_PREEMPTED
    except DgmrError as e:
        print(f"dgmr: error: {_printable(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("dgmr: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as e:
        print(f"dgmr: {e}; temporary output removed", file=sys.stderr)
        return EXIT_TERMINATED if e.signum == signal.SIGTERM else 128 + e.signum
    if result is not None:
        print_result(result, getattr(args, "json", False))
    return 0


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported by the sub-command that was given it (its usage,
    and the closest flag it has), not by the top-level parser."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub: argparse.ArgumentParser = getattr(args, "parser", parser)
        flags = [o for a in sub._actions for o in a.option_strings]
        unknown = next((x for x in extra if x.startswith("-")), extra[0])
        close = difflib.get_close_matches(unknown.split("=", 1)[0], flags, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _printable(e: BaseException) -> str:
    """The message with bytes that are not UTF-8 (from file names) escaped: printing lone
    surrogates would raise UnicodeEncodeError and turn the error line into a traceback."""
    from ..io.images import printable

    return printable(str(e))


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM and SIGUSR1 (SLURM's pre-emption warning) raise :class:`Terminated` in the
    main thread for the command (their default ends the process at once, leaving temporary
    output and the lock file behind); distill's training loop installs its own handler,
    which checkpoints first."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    with handling(STOP_SIGNALS, handler):
        yield


@contextlib.contextmanager
def _one_line_warnings():
    """A printed warning is one ``dgmr: warning: ...`` line on stderr (Python's own format adds
    the file, line and source of the call). Only the format changes: code that records
    warnings (a test) still gets them."""
    before = warnings.formatwarning

    def one_line(message: Warning | str, category: type, filename: str, lineno: int, line: str | None = None) -> str:
        return f"dgmr: warning: {_printable(str(message))}\n"

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = before
