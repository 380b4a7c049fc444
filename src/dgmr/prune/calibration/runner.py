"""Running the vision tower over the calibration batches, up to one module, with hooks set;
and the first pass that refuses, before any cut, a model calibration cannot handle."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ...core.errors import DgmrError, first_line
from ...models.sites.mlp import MlpSite, Proj
from .images import CalibrationData


# ---------------------------------------------------------------------------------------------
# running the model up to one MLP
class _Stop(BaseException):
    """Raised by a hook once the MLP being calibrated has run: the rest of the forward is not
    needed. A BaseException, so that a model's own ``except Exception`` does not swallow it."""


def tokens_of(t: torch.Tensor, proj: Proj) -> torch.Tensor:
    """(tokens, channels) view of what a projection reads or writes (NCHW maps for 1x1 convs)."""
    if isinstance(proj, nn.Conv2d):
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


@dataclass
class Runner:
    """Runs the vision tower over the calibration batches, stopping after a given module."""

    model: nn.Module
    family: Any
    data: CalibrationData
    device: torch.device

    precision: str = "auto"

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.device.type == "cuda")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _forward(self, x: torch.Tensor) -> Any:
        """The tower on one batch; a model that cannot take the calibration images says so in one line."""
        try:
            return self.family.image_forward(self.model, x.to(self.device, non_blocking=True))
        except (RuntimeError, ValueError, AssertionError, TypeError, IndexError) as e:
            raise DgmrError(f"the model's forward failed on the calibration images (batch of shape "
                            f"{tuple(x.shape)}): {first_line(e)}") from None

    def run_to(self, site: MlpSite, hooks: list[tuple[nn.Module, str, Callable]]) -> None:
        """Forward the batches until ``site`` has run, with ``hooks`` ((module, "pre"|"post", fn)) set."""

        def stop(*_: Any) -> None:
            raise _Stop

        handles = [m.register_forward_pre_hook(fn) if when == "pre" else m.register_forward_hook(fn)
                   for m, when, fn in hooks]
        handles.append(site.module.register_forward_hook(stop))
        try:
            with torch.no_grad(), self.autocast():
                for x in self.data.batches:
                    try:
                        self._forward(x)
                    except _Stop:
                        continue
                    raise DgmrError(f"{site.name} does not run in the model's forward: cannot calibrate it; "
                                    "prune without calibration")
        finally:
            for h in handles:
                h.remove()

    def forward_order(self, sites: list[MlpSite]) -> list[int]:
        """Indices of ``sites`` in the order the forward calls them. Runs every batch once, before
        anything is cut, so that a model that cannot calibrate (non-finite activations, an MLP
        that runs twice per forward or not at all) is refused while it is still whole."""
        calls: list[int] = []
        bad: list[str] = []

        def seen(i: int) -> Callable:
            def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
                calls.append(i)
                if isinstance(out, torch.Tensor) and not bad and not torch.isfinite(out).all():
                    bad.append(sites[i].name)
            return hook

        handles = [s.module.register_forward_hook(seen(i)) for i, s in enumerate(sites)]
        try:
            with torch.no_grad(), self.autocast():
                for x in self.data.batches:
                    calls.clear()
                    self._forward(x)
                    self._check_calls(sites, calls, bad)
        finally:
            for h in handles:
                h.remove()
        return list(dict.fromkeys(calls))

    @staticmethod
    def _check_calls(sites: list[MlpSite], calls: list[int], bad: list[str]) -> None:
        if bad:
            raise DgmrError(f"{bad[0]}: non-finite activations on the calibration images (NaN or inf in the model's "
                            "forward); nothing was cut")
        missing = [s.name for i, s in enumerate(sites) if i not in calls]
        if missing:
            raise DgmrError(f"{missing[0]} does not run in the model's forward ({len(missing)} such MLPs): cannot "
                            "calibrate it; prune without calibration")
        twice = next((i for i in set(calls) if calls.count(i) > 1), None)
        if twice is not None:
            raise DgmrError(f"{sites[twice].name} runs {calls.count(twice)} times per forward (shared weights): "
                            "calibration fits MLPs that run once; prune without calibration")
