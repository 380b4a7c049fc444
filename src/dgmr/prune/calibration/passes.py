"""How a calibrated prune runs its passes: the first pass over every image, before any cut,
refuses what calibration cannot handle and decides between the sweep over the blocks
(:mod:`.sweep`) and full forward passes (:mod:`.runner`) with a warning that says why."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...models.families import NoSequentialBlocks
from .runner import Runner
from .settings import CalibrationWarning
from .sweep import Chain, Probe, Step, Walker


@dataclass
class Passes:
    """How this prune runs its passes: the full-pass runner (``order``: the sites in forward
    order), and the sweep's chain and walker when the model's blocks run one by one
    (``fallback`` says why they do not, when they were asked to)."""

    runner: Runner
    order: list[int]
    chain: Chain | None = None
    walker: Walker | None = None
    fallback: str | None = None


def first_pass(runner: Runner, family: Any, model: nn.Module, steps: list[Step], sweep: bool) -> Passes:
    """The pass over every image before any cut: refuses what calibration cannot handle and,
    with ``sweep``, catches the first block's inputs and finds each step's block (or says
    why the blocks cannot run one by one)."""
    probe, why = None, None
    if sweep:
        try:
            blocks = family.sequential_blocks(model)
            if not blocks:
                raise NoSequentialBlocks(f"the {family.name} family names no blocks")
            probe = Probe(blocks, [(s.name, s.module) for s in steps])
        except NoSequentialBlocks as e:
            why = str(e)
    order = runner.forward_order(steps, probe)
    if probe is not None and probe.broken is None:
        chain = probe.chain()
        return Passes(runner, order, chain, Walker(chain, runner.autocast))
    why = why or (probe.broken if probe is not None else None)
    if why is not None:
        warnings.warn(f"calibration runs full forward passes up to every MLP (about {len(steps)}/2 passes instead "
                      f"of a few): the blocks of {type(model).__name__} cannot run one by one: {why}",
                      CalibrationWarning, stacklevel=4)
    return Passes(runner, order, fallback=why)
