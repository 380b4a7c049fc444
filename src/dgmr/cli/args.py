"""Argument types and groups several sub-commands share."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable


def model_kwargs_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0 (float("inf") and "nan" parse, and would reach the width arithmetic)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def add_width_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mlp-ratio", type=positive_number, help="keep round(R * embed_dim) hidden neurons per MLP (the paper's r)")
    g.add_argument("--hidden", type=int, help="keep N hidden neurons per MLP")
    g.add_argument("--keep-fraction", type=positive_number, help="keep this fraction of each MLP's hidden neurons")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="timm:NAME, open_clip:ARCH[:TAG], hf:REPO_OR_DIR, or a dgmr directory")
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
