"""The calibrated pruning pass (``dgmr.prune(..., calibration=...)``): MLP by MLP in forward
order, score (on weights or activations), cut, refit the down projection; optionally with
widths allocated across layers first (:mod:`.allocate`). The passes run block by block over
stored hidden states (:mod:`.sweep`), or, for a model whose blocks cannot run one by one,
as full forward passes up to each MLP (:mod:`.runner`)."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core import dist as D
from ...core.memory import out_of_memory
from ...models.families import NoSequentialBlocks
from ...models.preprocess import resolve_eval_preprocess
from ...models.sites.mlp import MlpSite, check_width, matrix, shrink_mlp
from ..criteria import criterion_scores, get_criterion, scoring_matrix, select_neurons
from .allocate import compensated_curve, dropped_curve, neuron_cost, spend, width_step
from .images import calibration_data
from .moments import Moments, activation_rows, hidden_moments, moment_hooks, pruned_moments
from .refit import down_coefficients, keep_original, refit_down
from .runner import Pass, Runner
from .settings import CalibrationSettings, CalibrationWarning
from .sweep import Chain, Probe, Step, Walker, walk

STATS_BUDGET = 2 << 30  # bytes of float64 statistics one full allocation pass may hold (layers grouped to fit)


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


# ---------------------------------------------------------------------------------------------
# global allocation
def _stat_bytes(site: MlpSite) -> int:
    h = site.hidden + 1
    return 8 * h * (h + matrix(site.down).shape[0])


def _groups(sites: list[MlpSite], order: list[int]) -> list[list[int]]:
    """Consecutive runs of ``order`` whose statistics fit STATS_BUDGET together (one pass each)."""
    groups: list[list[int]] = []
    size = 0
    for i in order:
        b = _stat_bytes(sites[i])
        if not groups or size + b > STATS_BUDGET:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += b
    return groups


def _error_curve(site: MlpSite, mom: Moments, criterion: str, seed: int, settings: CalibrationSettings) -> torch.Tensor:
    """Relative output error of ``site`` as a function of its width (index k = width k)."""
    if criterion_scores(criterion) == "activations":
        rows = activation_rows(mom, site.down, settings.ridge)
    else:
        rows = scoring_matrix(*site.scoring_weights())
    rank = get_criterion(criterion)(rows, site.hidden, seed=seed).long()  # the full order: prefixes are picks
    if settings.compensation:
        return compensated_curve(mom, rank, settings.ridge)
    return dropped_curve(mom, rank, down_coefficients(site.down)[: site.hidden].T)


def _allocation_moments(passes: Passes, sites: list[MlpSite]) -> Iterator[tuple[int, Moments]]:
    """Every site's moments on the original model: block by block (one run of each block
    gathers its sites' statistics and makes the next block's inputs), then the sites after
    the blocks; or, without a chain, in full passes grouped to fit STATS_BUDGET."""
    chain, walker = passes.chain, passes.walker
    if chain is None or walker is None:
        groups = _groups(sites, passes.order)
    else:
        for j in range(chain.last + 1):
            hooks, moms = moment_hooks([sites[i] for i in chain.members[j]])
            walker.advance(j, hooks)
            for i in chain.members[j]:
                yield i, moms[sites[i].name].check()
        # the walk starts again from the first block: catch its inputs again (the embedding only)
        chain.states[:] = passes.runner.inputs_of(chain.blocks[0])
        groups = _groups(sites, chain.tail) if chain.tail else []
    for group in groups:
        moms = hidden_moments(passes.runner.run_to, [sites[i] for i in group])
        for i in group:
            yield i, moms.pop(sites[i].name)


def allocate_widths(passes: Passes, sites: list[MlpSite], ks: list[int], criterion: str, seed: int,
                    settings: CalibrationSettings, progress: bool) -> tuple[list[int], list[float]]:
    """Per-layer widths spending the uniform ``ks``' parameters by measured error (on the
    original model), and each layer's estimated relative error at its new width."""
    curves: list[torch.Tensor] = [torch.zeros(0)] * len(sites)
    bar = tqdm(total=len(sites), desc="allocate", unit="layer", disable=not progress, leave=False)
    for i, mom in _allocation_moments(passes, sites):
        curves[i] = _error_curve(sites[i], mom, criterion, seed + i, settings)
        bar.update()
    bar.close()
    widths = spend(curves, [neuron_cost(s) for s in sites], ks, [s.hidden for s in sites],
                   [width_step(s) for s in sites], settings.allocate_floor, settings.allocate_ceiling)
    return widths, [float(c[k]) for c, k in zip(curves, widths)]


# ---------------------------------------------------------------------------------------------
# one MLP
@dataclass
class MlpStep:
    """An MLP site as a :class:`~dgmr.prune.calibration.sweep.Step` (``k``: its width, set
    again by global allocation)."""

    site: MlpSite
    k: int
    criterion: str
    seed: int
    settings: CalibrationSettings

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def module(self) -> nn.Module:
        return self.site.module

    def cut(self, run: Pass) -> tuple[int, torch.Tensor, dict[str, Any]]:
        with out_of_memory("calibrating it (its statistics, the cut and the refit)", 2 * _stat_bytes(self.site),
                           layer=self.name):
            return cut_mlp(run, self.site, self.k, self.criterion, self.seed, self.settings)


def cut_mlp(run: Pass, site: MlpSite, k: int, criterion: str, seed: int,
            settings: CalibrationSettings) -> tuple[int, torch.Tensor, dict[str, Any]]:
    """Score, cut and (with compensation) refit one MLP with passes ``run``; returns its width
    before, the kept indices and what the refit did.

    A weights criterion picks before any pass, so the refit's statistics cover the kept
    neurons only. Without hidden norms the cut MLP's hidden layer is the kept columns of the
    original's, so one pass gives the activations to score and the refit's statistics (a
    sub-block); a hidden norm renormalises after the cut, so then a pass runs the cut MLP."""
    h = site.hidden
    check_width(site, k)
    if k == h:  # nothing cut: the original MLP is its own best fit (and a bf16 fit would only add noise)
        return h, torch.arange(k), ({"rel_err_before": 0.0, "rel_err_after": 0.0, "refit": False}
                                    if settings.compensation else {})
    sliceable = not site.norms
    w1, w_gate = site.scoring_weights()
    mom = None
    if criterion_scores(criterion) == "activations":
        mom = hidden_moments(run, [site])[site.name]
        acts = activation_rows(mom, site.down, settings.ridge)
        keep = select_neurons(w1, k, criterion, w_gate=w_gate, seed=seed, activations=acts)
        mom = mom.sub(keep) if settings.compensation and sliceable else None
    else:
        keep = select_neurons(w1, k, criterion, w_gate=w_gate, seed=seed)
        if settings.compensation and sliceable:
            mom = hidden_moments(run, [site], cols={site.name: keep})[site.name]
    if not settings.compensation:
        shrink_mlp(site, keep)
        return h, keep, {}
    if mom is not None:
        shrink_mlp(site, keep)
        return h, keep, refit_down(site, mom, settings.ridge)
    original = keep_original(site)
    shrink_mlp(site, keep)
    return h, keep, refit_down(site, pruned_moments(run, site, original), settings.ridge)


@contextlib.contextmanager
def _calibration_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The model in eval mode on the calibration device, in float32 on a CPU (no half-precision
    CPU kernels for every op); afterwards each module's own mode, and the model's device and dtype, again."""
    modes = {m: m.training for m in model.modules()}
    first = next(model.parameters())
    home, dtype = first.device, first.dtype
    try:
        model.eval().to(device)
        if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            model.float()
        yield
    finally:
        model.to(device=home, dtype=dtype)
        for m, mode in modes.items():
            m.training = mode


def calibrated_prune(model: nn.Module, family: Any, sites: list[MlpSite], ks: list[int], record: Any, data: Any,
                     settings: CalibrationSettings, *, criterion: str, seed: int, progress: bool,
                     source: Any = None) -> None:
    """Prune ``sites`` of ``model`` in place with calibration ``data``; fills ``record``."""
    device = D.pick_device(settings.calibration_device)
    pre = resolve_eval_preprocess(model, family, source=source)
    cal = calibration_data(data, pre.transform, settings, seed=seed)
    with _calibration_state(model, device):
        runner = Runner(model, family, cal, device, settings.calibration_precision)
        steps = [MlpStep(s, k, criterion, seed + i, settings) for i, (s, k) in enumerate(zip(sites, ks))]
        passes = first_pass(runner, family, model, steps, settings.calibration_sweep)
        estimates = None
        if settings.allocate == "global":
            widths, estimates = allocate_widths(passes, sites, ks, criterion, seed, settings, progress)
            for step, k in zip(steps, widths):
                step.k = k
        done = walk(steps, passes.chain, passes.walker, runner.run_to, passes.order, progress,
                    f"prune ({criterion}, calibrated)")
    for i, site in enumerate(sites):
        h, keep, info = done[i]
        if estimates is not None:
            info["rel_err_estimate"] = estimates[i]
        record.add(site, h, keep, **info)
    record.calibration = {"images": cal.images, "unreadable": cal.unreadable, "data": cal.description,
                          "compensate": settings.compensation,
                          "allocate": settings.allocate, "criterion": criterion, "ridge": settings.ridge,
                          "preprocess": pre.settings if cal.decoded else None, "device": device.type,
                          "precision": "bf16" if runner.bf16 else "fp32",
                          "passes": "sweep" if passes.chain is not None else "full",
                          **({"fallback": passes.fallback} if passes.fallback else {}),
                          **({"floor": settings.allocate_floor, "ceiling": settings.allocate_ceiling}
                             if settings.allocate == "global" else {})}
