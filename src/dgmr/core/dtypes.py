"""The dtype table: the names dgmr accepts for weights and compute, parsed in one place."""
from __future__ import annotations

import torch

from .errors import DgmrError

# the compute precisions a user picks (calibration, distillation): bf16 autocast on GPUs under auto
PRECISIONS = ("auto", "bf16", "fp32")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype, *, what: str = "dtype", any_float: bool = False) -> torch.dtype:
    """``torch.dtype`` for ``name`` (one of :data:`DTYPES`; with ``any_float``, any floating
    torch dtype such as a checkpoint's ``float64``); a clear error naming ``what`` otherwise."""
    if isinstance(name, torch.dtype):
        return name
    if name in DTYPES:
        return DTYPES[name]
    found = getattr(torch, str(name), None) if any_float and isinstance(name, str) else None
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return found
    raise DgmrError(f"unknown {what} {name!r}; choose one of {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
