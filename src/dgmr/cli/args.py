"""Argument types and groups several sub-commands share."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable

from ..core.errors import DgmrError


def model_kwargs_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def finite_number(flag: str) -> Callable[[str], float]:
    """An argparse type for a float flag that must be finite: ``float()`` accepts "inf" and
    "nan", which would reach the width arithmetic (OverflowError). A value that parses but is
    not finite is a :class:`DgmrError` (one ``dgmr: error:`` line, like the library's own
    range checks, e.g. "must be > 0"); text that is not a number stays a usage error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise DgmrError(f"{flag} must be a finite number, got {text!r}")
        return value

    return parse


MODEL_HELP = "timm:NAME, open_clip:ARCH[:TAG], hf:REPO_OR_DIR, or a dgmr directory"


def add_model_args(p: argparse.ArgumentParser, kwargs: bool = True) -> None:
    """MODEL, and ``--model-kwargs`` unless a settings dataclass declares it (``kwargs=False``)."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    if not kwargs:
        return
    p.add_argument("--model-kwargs", type=model_kwargs_arg, default=None, metavar="JSON",
                   help="extra architecture arguments (timm create_model kwargs, open_clip create_model kwargs, "
                        "HF config overrides), e.g. '{\"img_size\": 64}'")


def number_list(cast: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse type for comma-separated numbers of one kind."""

    def parse(text: str) -> list[Any]:
        try:
            vals = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError("empty list")
        return vals

    return parse
