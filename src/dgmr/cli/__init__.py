"""``dgmr`` command line: a thin layer over the library functions.

Each command module exposes ``register(subparsers)`` that adds its sub-parser with a
``func(args) -> dict`` default; :func:`main` prints the dict (``--json``) or a summary and
turns :class:`DgmrError` into one ``dgmr: error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import contextlib
import logging
import signal
import sys
import threading
from typing import Any, Sequence

from .. import __version__
from ..errors import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_TERMINATED, DgmrError, Preempted,
                      Terminated)

# modules that add sub-commands (each has register(subparsers))
COMMAND_MODULES = ("dgmr.cli.prune", "dgmr.cli.imports", "dgmr.cli.distill", "dgmr.cli.eval", "dgmr.cli.demo")


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
    return p


def print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, int) and abs(v) >= 10_000:
            v = f"{v:,}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        print(f"{k:>20}: {v}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parser.parse_args(argv)  # inside: an argument type may raise DgmrError (cli.args.finite_number)
        with _sigterm_raises():
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


def _printable(e: BaseException) -> str:
    """The message with bytes that are not UTF-8 (from file names) escaped: printing lone
    surrogates would raise UnicodeEncodeError and turn the error line into a traceback."""
    from ..images import printable

    return printable(str(e))


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM and SIGUSR1 (SLURM's pre-emption warning) raise :class:`Terminated` in the
    main thread for the command (their default ends the process at once, leaving temporary
    output and the lock file behind); distill's training loop installs its own handler,
    which checkpoints first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    signals = [signal.SIGTERM, *([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])]
    before = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
