"""The dtype table: the names dgmr accepts for weights and compute, parsed in one place."""
from __future__ import annotations

import torch

from .errors import DgmrError

# the compute precisions a user picks (calibration, distillation): bf16 autocast on GPUs under auto
PRECISIONS = ("auto", "bf16", "fp32")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# the dtypes a dgmr directory's weights may be in (its config.json "dtype"): the above and a
# checkpoint's float64; float8 and other exotic dtypes have no kernels for what dgmr runs on them
WEIGHT_DTYPES: dict[str, torch.dtype] = {**DTYPES, "float64": torch.float64}


def parse_dtype(name: str | torch.dtype, *, what: str = "dtype", weights: bool = False) -> torch.dtype:
    """``torch.dtype`` for ``name`` (one of :data:`DTYPES`; with ``weights``, one of
    :data:`WEIGHT_DTYPES`); a clear error naming ``what`` otherwise."""
    table = WEIGHT_DTYPES if weights else DTYPES
    if isinstance(name, torch.dtype):
        if name in table.values():
            return name
        name = dtype_name(name)
    elif isinstance(name, str) and name in table:
        return table[name]
    raise DgmrError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")


def weight_dtype_name(dtype: torch.dtype, where: str = "") -> str:
    """The config.json name of a weight dtype dgmr can load back; refused (before anything is
    written) for any other."""
    if dtype not in WEIGHT_DTYPES.values():
        raise DgmrError(f"cannot save {where or 'a model'} in {dtype_name(dtype)}: dgmr loads weights in "
                        f"{', '.join(WEIGHT_DTYPES)} (convert it first, e.g. model.float())")
    return dtype_name(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
