"""The calibrated pruning pass (``dgmr.prune(..., calibration=...)``): layer by layer in
forward order, score (on weights or activations), cut, and refit the projection that reads
the cut width: an MLP's down projection here, an attention layer's output projection in
:mod:`.heads`; optionally with widths and head counts allocated first (:mod:`.budget`). The
passes run block by block over stored hidden states (:mod:`.sweep`), or, for a model whose
blocks cannot run one by one, as full forward passes up to each layer (:mod:`.passes`)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ...core import dist as D
from ...core.memory import out_of_memory
from ...models.preprocess import resolve_eval_preprocess
from ...models.sites.attention import AttentionSite
from ...models.sites.mlp import MlpSite, check_width, shrink_mlp
from ..criteria import criterion_scores, get_criterion, scoring_matrix, select_neurons
from .allocate import compensated_curve, dropped_curve, neuron_cost, width_step
from .budget import allocate, fraction_budget, uniform_budget
from .heads import HeadStep, hookable, restore_uncut
from .images import calibration_data
from .moments import Moments, activation_rows, hidden_moments, moment_bytes
from .passes import first_pass
from .refit import cut_and_refit, down_coefficients, keep_original
from .runner import Pass, Runner
from .settings import CalibrationSettings
from .sweep import SiteStep, walk

# ---------------------------------------------------------------------------------------------
# one MLP
class MlpStep(SiteStep):
    """An MLP site as a :class:`~dgmr.prune.calibration.sweep.Step` (``k``: its width)."""

    site: MlpSite

    @property
    def unit_cost(self) -> float:
        return neuron_cost(self.site)

    @property
    def full(self) -> int:
        return self.site.hidden

    @property
    def step(self) -> int:
        return width_step(self.site)

    bounded = True  # global allocation keeps it within the floor and ceiling times its uniform width

    def curve(self, mom: Moments) -> torch.Tensor:
        """Relative output error as a function of the width (index k = width k), from the
        original MLP's statistics ``mom``."""
        site, settings = self.site, self.settings
        if criterion_scores(self.criterion) == "activations":
            rows = activation_rows(mom, site.down, settings.ridge)
        else:
            rows = scoring_matrix(*site.scoring_weights())
        rank = get_criterion(self.criterion)(rows, site.hidden, seed=self.seed).long()  # prefixes are picks
        if settings.compensation:
            return compensated_curve(mom, rank, settings.ridge)
        return dropped_curve(mom, rank, down_coefficients(site.down)[: site.hidden].T)

    def cut(self, run: Pass) -> tuple[int, torch.Tensor, dict[str, Any]]:
        with out_of_memory("calibrating it (its statistics, the cut and the refit)", 2 * moment_bytes(self.site),
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
    return h, keep, cut_and_refit(run, site, keep, mom, settings, shrink_mlp, keep_original)


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


def _steps(sites: list[MlpSite], ks: list[int | None], attention: list[AttentionSite], hs: list[int | None],
           criterion: str, seed: int, settings: CalibrationSettings) -> tuple[list[Any], list[int]]:
    """One step per MLP and per attention layer, and the indices of those whose width is
    free (``None``: for ``params_fraction`` to decide; they start whole)."""
    steps: list[Any] = [MlpStep(s, s.hidden if k is None else k, criterion, seed + i, settings)
                        for i, (s, k) in enumerate(zip(sites, ks))]
    steps += [HeadStep(s, s.heads if k is None else k, criterion, seed + i, settings)
              for i, (s, k) in enumerate(zip(attention, hs))]
    return steps, [i for i, k in enumerate([*ks, *hs]) if k is None]


def calibrated_prune(model: nn.Module, family: Any, sites: list[MlpSite], ks: list[int | None], record: Any,
                     data: Any, settings: CalibrationSettings, *, criterion: str, seed: int, progress: bool,
                     source: Any = None, attention: list[AttentionSite] = (), hs: list[int | None] = (),
                     params_fraction: float | None = None) -> None:
    """Prune the MLPs ``sites`` to widths ``ks`` and the attention layers ``attention`` to
    ``hs`` heads, in place, with calibration ``data``; fills ``record``. With
    ``params_fraction`` (and global allocation) the widths and head counts given as ``None``
    spend that fraction of the vision tower's parameters (:mod:`.budget`)."""
    device = D.pick_device(settings.calibration_device)
    pre = resolve_eval_preprocess(model, family, source=source)
    cal = calibration_data(data, pre.transform, settings, seed=seed)
    attention, swapped = hookable(model, family, list(attention)) if attention else ([], [])
    with _calibration_state(model, device):
        runner = Runner(model, family, cal, device, settings.calibration_precision)
        steps, free = _steps(sites, list(ks), attention, list(hs), criterion, seed, settings)
        passes = first_pass(runner, family, model, steps, settings.calibration_sweep)
        estimates: dict[int, float] = {}
        budget = None
        if settings.allocate == "global":
            budget = (uniform_budget(steps) if params_fraction is None else
                      fraction_budget(steps, free, family.vision_params(model), params_fraction))
            estimates = allocate(passes, steps, budget, settings, progress)
        whole = {id(s.module) for s in steps if isinstance(s, HeadStep) and s.k == s.full}  # before any cut
        done = walk(steps, passes.chain, passes.walker, runner.run_to, passes.order, progress,
                    f"prune ({criterion}, calibrated)")
    restore_uncut(swapped, whole)
    for i, step in enumerate(steps):
        h, keep, info = done[i]
        if i in estimates:
            info["rel_err_estimate"] = estimates[i]
        (record.add_heads if isinstance(step, HeadStep) else record.add)(step.site, h, keep, **info)
    record.calibration = {"images": cal.images, "unreadable": cal.unreadable, "data": cal.description,
                          "compensate": settings.compensation,
                          "allocate": settings.allocate, "criterion": criterion, "ridge": settings.ridge,
                          "preprocess": pre.settings if cal.decoded else None, "device": device.type,
                          "precision": "bf16" if runner.bf16 else "fp32",
                          "passes": "sweep" if passes.chain is not None else "full",
                          **({"fallback": passes.fallback} if passes.fallback else {}),
                          **({"floor": settings.allocate_floor, "ceiling": settings.allocate_ceiling}
                             if settings.allocate == "global" else {}),
                          **({"params_fraction": params_fraction, "params_target": budget.target}
                             if budget is not None and budget.target is not None else {})}
