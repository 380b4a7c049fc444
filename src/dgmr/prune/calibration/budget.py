"""One parameter budget, spent where the calibration statistics say it matters most
(``allocate="global"``; docs/calibration.md, "Global allocation", and docs/heads.md, "One budget").

The budget is either the uniform request's own (the same total MLP parameters as every MLP
at the requested width), or ``params_fraction`` F of the vision tower's parameters, spent
across MLP neurons and attention heads together. One statistics pass over the original
model gives every free layer's relative output error as a function of its width (neurons,
or heads); the exchange of :func:`~dgmr.prune.calibration.allocate.spend` then hands out
neurons and heads, from each layer's floor, to the layer whose error drops most per
parameter until the budget is spent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from tqdm.auto import tqdm

from ...core.errors import DgmrError
from .allocate import bounds, spend
from .moments import Fitted, Moments, hidden_moments, moment_bytes, moment_hooks
from .passes import Passes
from .settings import CalibrationSettings

STATS_BUDGET = 2 << 30  # bytes of float64 statistics one full allocation pass may hold (layers grouped to fit)


class Spendable(Protocol):
    """A step global allocation can size: its site, its width (``k``), its unit's parameters
    (a neuron's, a head's), its original width, the multiple its width must be, and its
    relative output error as a function of its width from the original's statistics."""

    site: Fitted
    k: int

    @property
    def unit_cost(self) -> float: ...

    @property
    def full(self) -> int: ...

    @property
    def step(self) -> int: ...

    @property
    def bounded(self) -> bool: ...

    def curve(self, mom: Moments) -> torch.Tensor: ...


@dataclass
class Budget:
    """What global allocation spends: the steps whose widths it picks (``free``, indices into
    the steps), the parameters their units may hold together (``total``), and the uniform
    width of each (``reference``), which the floor and ceiling scale; None with
    ``params_fraction`` (``target``: the tower's parameters asked for), which asks for no width."""

    free: list[int]
    total: float
    reference: list[float] | None
    target: int | None = None


def uniform_budget(steps: list[Spendable]) -> Budget:
    """The uniform request's own budget: every step free, its requested width the reference."""
    return Budget(list(range(len(steps))), sum(s.unit_cost * s.k for s in steps), [float(s.k) for s in steps])


def fraction_budget(steps: list[Spendable], free: list[int], tower_params: int, fraction: float) -> Budget:
    """``fraction`` of the tower's ``tower_params`` spent on the ``free`` steps (the others keep
    their widths): what their units may hold once everything else is counted."""
    if not free:
        raise DgmrError("params_fraction has nothing to spend: the MLP widths and the head counts are both given; "
                        "drop one of them (or params_fraction)")
    fixed_cut = sum(s.unit_cost * (s.full - s.k) for i, s in enumerate(steps) if i not in set(free))
    movable = sum(steps[i].unit_cost * steps[i].full for i in free)
    target = fraction * tower_params
    total = target - (tower_params - movable - fixed_cut)
    least = tower_params - movable - fixed_cut + sum(steps[i].unit_cost * steps[i].step for i in free)
    if least > target:  # (also where nothing is left for the free layers: a unit costs > 0)
        raise DgmrError(f"params_fraction {fraction:g} keeps {target:,.0f} of the vision tower's {tower_params:,} "
                        f"parameters, but the smallest cut allowed keeps {least:,.0f} "
                        f"({least / tower_params:.1%}: embeddings, norms and one head or one neuron in every "
                        "layer); ask for more")
    return Budget(list(free), total, None, target=round(target))


def _bounds(steps: list[Spendable], budget: Budget, settings: CalibrationSettings) -> tuple[list[int], list[int]]:
    """Each step's allowed widths. A uniform request's budget keeps every MLP within the floor
    and ceiling times its requested width (they bound how far the allocation departs from
    that request) and lets an attention layer keep any head count from one to all (a head is
    too coarse a unit to scale: at three heads, half to twice a uniform 1.1 would pin every
    layer to one or two). ``params_fraction`` asks for no width at all: every layer may take
    any width from one step to its original one, and the measured errors decide."""
    if budget.reference is None:
        return [s.step for s in steps], [s.full for s in steps]
    lo, hi = bounds(budget.reference, [s.full for s in steps], [s.step for s in steps], settings.allocate_floor,
                    settings.allocate_ceiling)
    for j, s in enumerate(steps):
        if not s.bounded:
            lo[j], hi[j] = s.step, s.full
    return lo, hi


def _groups(sites: list[Fitted], order: list[int]) -> list[list[int]]:
    """Consecutive runs of ``order`` whose statistics fit STATS_BUDGET together (one pass each)."""
    groups: list[list[int]] = []
    size = 0
    for i in order:
        b = moment_bytes(sites[i])
        if not groups or size + b > STATS_BUDGET:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += b
    return groups


def _allocation_moments(passes: Passes, sites: list[Fitted], wanted: set[int]) -> Iterator[tuple[int, Moments]]:
    """The moments of every ``wanted`` site on the original model: block by block (one run of
    each block gathers its sites' statistics and makes the next block's inputs), then the
    sites after the blocks; or, without a chain, in full passes grouped to fit STATS_BUDGET."""
    chain, walker = passes.chain, passes.walker
    if chain is None or walker is None:
        groups = _groups(sites, [i for i in passes.order if i in wanted])
    else:
        for j in range(chain.last + 1):
            members = [i for i in chain.members[j] if i in wanted]
            hooks, moms = moment_hooks([sites[i] for i in members])
            walker.advance(j, hooks)
            for i in members:
                yield i, moms[sites[i].name].check()
        # the walk starts again from the first block: catch its inputs again (the embedding only)
        chain.states[:] = passes.runner.inputs_of(chain.blocks[0])
        tail = [i for i in chain.tail if i in wanted]
        groups = _groups(sites, tail) if tail else []
    for group in groups:
        moms = hidden_moments(passes.runner.run_to, [sites[i] for i in group])
        for i in group:
            yield i, moms.pop(sites[i].name)


def allocate(passes: Passes, steps: list[Spendable], budget: Budget, settings: CalibrationSettings,
             progress: bool) -> dict[int, float]:
    """Set the width of every free step to spend ``budget`` by measured error (statistics of
    the original model); returns each free step's estimated relative error at its new width."""
    free = budget.free
    curves: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(free), desc="allocate", unit="layer", disable=not progress, leave=False)
    for i, mom in _allocation_moments(passes, [s.site for s in steps], set(free)):
        curves[i] = steps[i].curve(mom)
        bar.update()
    bar.close()
    chosen = [steps[i] for i in free]
    lo, hi = _bounds(chosen, budget, settings)
    widths = spend([curves[i] for i in free], [s.unit_cost for s in chosen], budget.total, lo, hi,
                   [s.step for s in chosen])
    for s, k in zip(chosen, widths):
        s.k = k
    return {i: float(curves[i][k]) for i, k in zip(free, widths)}
