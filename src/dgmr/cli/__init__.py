"""``dgmr`` command line: a thin layer over the library functions.

Each command module exposes ``register(subparsers)`` that adds its sub-parser with a
``func(args) -> dict`` default; :func:`main` prints the dict (``--json``) or a summary and
turns :class:`DgmrError` into one ``dgmr: error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any, Sequence

from .. import __version__
from ..errors import DgmrError

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except DgmrError as e:
        print(f"dgmr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgmr: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        print_result(result, getattr(args, "json", False))
    return 0
