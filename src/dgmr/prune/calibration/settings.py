"""What a calibrated prune is asked to do (:class:`CalibrationSettings`): the fields are
``dgmr prune``'s calibration flags (``calibration_images`` is ``--calibration-images``) and
the keywords of ``dgmr.prune(..., calibration=DATA)``."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from ...core.dtypes import PRECISIONS
from ...core.errors import DgmrError
from ...core.settings import setting, unknown_keyword

ALLOCATIONS = ("uniform", "global")
GROUP = "calibration (docs/calibration.md)"
# the keywords of dgmr.prune before they took the flags' names: still accepted
ALIASES = {"images": "calibration_images", "compensate": "compensation", "floor": "allocate_floor",
           "ceiling": "allocate_ceiling", "batch_size": "calibration_batch_size", "device": "calibration_device",
           "precision": "calibration_precision"}


class CalibrationWarning(UserWarning):
    """Calibration went on, but with less than it asked for (few tokens, an unsolvable layer)."""


@dataclass
class CalibrationSettings:
    """How calibration runs; the fields are ``dgmr prune``'s calibration flags and the
    keywords ``dgmr.prune(..., calibration=DATA, **settings)`` takes."""

    calibration_images: int = setting(256, "calibration images to use (a seeded sample of DATA)", metavar="N",
                                      group=GROUP)
    compensation: bool = setting(True, "refit every cut MLP's down projection by least squares to the original "
                                       "MLP's output", group=GROUP,
                                 off="do not refit the cut MLPs' down projections (cut as the weights-only prune "
                                     "does; the images still serve --criterion diversity-act and --allocate global)")
    allocate: str = setting("uniform", "uniform: the requested width in every MLP; global: the same total MLP "
                                       "parameters (and heads, with --heads or --params-fraction) spread across "
                                       "layers by measured reconstruction error",
                            choices=ALLOCATIONS, group=GROUP)
    ridge: float = setting(1e-4, "ridge of the refit, relative to the mean diagonal of the activations' Gram "
                                 "matrix (pulls towards the original weights)", metavar="R", group=GROUP)
    allocate_floor: float = setting(0.5, "with --allocate global: no MLP narrower than this times the uniform width "
                                          "(not with --params-fraction, which asks for no width)",
                                    metavar="F", group=GROUP)
    allocate_ceiling: float = setting(2.0, "with --allocate global: no MLP wider than this times the uniform width "
                                           "(nor its original width)", metavar="F", group=GROUP)
    calibration_sweep: bool = setting(True, "run the tower's blocks one at a time on stored hidden states (a few "
                                            "forward passes in all, whatever the depth)", group=GROUP,
                                      off="run full forward passes up to every MLP instead (about depth/2 passes: "
                                          "what models whose blocks cannot run one by one fall back to)")
    calibration_batch_size: int = setting(32, "images per calibration forward", metavar="B", group=GROUP)
    calibration_device: str = setting("auto", "where the calibration forward runs (auto: cuda when available)",
                                      group=GROUP)
    calibration_precision: str = setting("auto", "the calibration forward's precision (auto: bf16 autocast on GPUs, "
                                                 "fp32 on the CPU); statistics are float64 either way",
                                         choices=PRECISIONS, group=GROUP)

    def __post_init__(self) -> None:
        if not (isinstance(self.calibration_images, int) and self.calibration_images > 0):
            raise DgmrError(f"calibration images must be a positive integer, got {self.calibration_images!r}")
        if not (isinstance(self.calibration_batch_size, int) and self.calibration_batch_size > 0):
            raise DgmrError(f"calibration batch size must be a positive integer, got {self.calibration_batch_size!r}")
        if self.calibration_precision not in PRECISIONS:
            raise DgmrError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.calibration_precision!r}")
        if self.allocate not in ALLOCATIONS:
            raise DgmrError(f"allocate must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}")
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise DgmrError(f"ridge must be a finite number >= 0, got {self.ridge}")
        lo, hi = self.allocate_floor, self.allocate_ceiling
        if not (0 < lo <= 1 <= hi and math.isfinite(hi)):
            raise DgmrError(f"allocation bounds need 0 < floor <= 1 <= ceiling (finite), got floor {lo}, ceiling {hi}")

    @classmethod
    def from_keywords(cls, function: str = "prune", **given: Any) -> "CalibrationSettings":
        """The settings from keywords named like the flags, or by their older names (:data:`ALIASES`);
        an unknown keyword is Python's TypeError."""
        unknown_keyword(function, given, cls, set(ALIASES))
        values: dict[str, Any] = {}
        for key, value in given.items():
            name = ALIASES.get(key, key)
            if name in values:
                raise TypeError(f"{function}() got {name!r} twice (once as {key!r})")
            values[name] = value
        old = sorted(k for k in given if k in ALIASES)
        if old:
            warnings.warn(f"{function}(): {', '.join(old)} are now called "
                          f"{', '.join(ALIASES[k] for k in old)}, as the flags are", FutureWarning, stacklevel=3)
        return cls(**values)
