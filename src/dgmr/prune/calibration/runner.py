"""Running the vision tower over the calibration batches, up to one module, with hooks set;
and the first pass that refuses, before any cut, a model calibration cannot handle (and, for
the sweep, catches the first block's inputs: :mod:`.sweep`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from ...core.errors import DgmrError, first_line
from ...models.sites.mlp import Proj
from .images import CalibrationData


# ---------------------------------------------------------------------------------------------
# running the model up to one MLP
class Stop(BaseException):
    """Raised by a hook once the module being calibrated has run: the rest of the forward is not
    needed. A BaseException, so that a model's own ``except Exception`` does not swallow it."""


def stop(*_: Any) -> None:
    raise Stop


# (module, "pre" | "pre_kw" | "post", fn): a forward hook, or a pre-hook (given the keyword
# arguments too with "pre_kw"), to set for one pass
Hook = tuple[nn.Module, str, Callable]


class Site(Protocol):
    """What the first pass watches: a named module that must run once per forward."""

    name: str
    module: nn.Module


class Pass(Protocol):
    """One pass over the calibration images through the model as it is now (cut and refitted
    up to here), with ``hooks`` set, stopping right after ``stop`` has run (``what`` names it
    in errors): full forward passes (:meth:`Runner.run_to`) or the current block of the sweep
    (:meth:`dgmr.prune.calibration.sweep.Walker.run`)."""

    def __call__(self, stop: nn.Module, hooks: list[Hook], what: str) -> None: ...


def set_hooks(hooks: list[Hook]) -> list[Any]:
    return [m.register_forward_pre_hook(fn, with_kwargs=when == "pre_kw") if when.startswith("pre")
            else m.register_forward_hook(fn) for m, when, fn in hooks]


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

    def run_to(self, stop_at: nn.Module, hooks: list[Hook], what: str) -> None:
        """Forward the batches until ``stop_at`` has run, with ``hooks`` set (a :class:`Pass`)."""
        handles = set_hooks(hooks)
        handles.append(stop_at.register_forward_hook(stop))
        try:
            with torch.no_grad(), self.autocast():
                for x in self.data.batches:
                    try:
                        self._forward(x)
                    except Stop:
                        continue
                    raise DgmrError(f"{what} does not run in the model's forward: cannot calibrate it; "
                                    "prune without calibration")
        finally:
            for h in handles:
                h.remove()

    def inputs_of(self, module: nn.Module) -> list[torch.Tensor]:
        """``module``'s first positional argument on every batch (the forward stops there)."""
        seen: list[torch.Tensor] = []

        def take(_m: nn.Module, args: tuple) -> None:
            seen.append(args[0])
            raise Stop

        self.run_to(module, [(module, "pre", take)], type(module).__name__)
        return seen

    def forward_order(self, sites: Sequence[Site], probe: Any = None) -> list[int]:
        """Indices of ``sites`` (MLP sites, or the steps that cut them) in the order the forward
        calls them. Runs every batch once, before anything is cut, so that a model that cannot
        calibrate (non-finite activations, an MLP that runs twice per forward or not at all) is
        refused while it is still whole. A ``probe`` (:class:`~dgmr.prune.calibration.sweep.Probe`)
        watches the same pass."""
        calls: list[int] = []
        bad: list[str] = []

        def seen(i: int) -> Callable:
            def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
                calls.append(i)
                # one float64 sum: NaN or inf anywhere reaches it (no float32 value can overflow it)
                if isinstance(out, torch.Tensor) and not bad and not torch.isfinite(out.sum(dtype=torch.float64)):
                    bad.append(sites[i].name)
            return hook

        handles = [s.module.register_forward_hook(seen(i)) for i, s in enumerate(sites)]
        handles += probe.install() if probe is not None else []
        try:
            with torch.no_grad(), self.autocast():
                for x in self.data.batches:
                    calls.clear()
                    self._forward(x)
                    self._check_calls(sites, calls, bad)
                    if probe is not None:
                        probe.after_batch()
        finally:
            for h in handles:
                h.remove()
        return list(dict.fromkeys(calls))

    @staticmethod
    def _check_calls(sites: Sequence[Site], calls: list[int], bad: list[str]) -> None:
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
