"""The calibrated pruning pass (``dgmr.prune(..., calibration=...)``): MLP by MLP in forward
order, score (on weights or activations), cut, refit the down projection; optionally with
widths allocated across layers first (:mod:`.allocate`)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core import dist as D
from ...core.memory import out_of_memory
from ...models.preprocess import resolve_eval_preprocess
from ...models.sites.mlp import MlpSite, check_width, matrix, shrink_mlp
from ..criteria import criterion_scores, get_criterion, scoring_matrix, select_neurons
from .allocate import compensated_curve, dropped_curve, neuron_cost, spend, width_step
from .images import calibration_data
from .moments import activation_rows, hidden_moments, pruned_moments
from .refit import down_coefficients, keep_original, refit_down
from .runner import Runner
from .settings import CalibrationSettings

STATS_BUDGET = 2 << 30  # bytes of float64 statistics one allocation pass may hold (layers grouped to fit)


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


def _error_curve(site: MlpSite, mom: Any, criterion: str, seed: int, settings: CalibrationSettings) -> torch.Tensor:
    """Relative output error of ``site`` as a function of its width (index k = width k)."""
    if criterion_scores(criterion) == "activations":
        rows = activation_rows(mom, site.down, settings.ridge)
    else:
        rows = scoring_matrix(*site.scoring_weights())
    rank = get_criterion(criterion)(rows, site.hidden, seed=seed).long()  # the full order: prefixes are picks
    if settings.compensation:
        return compensated_curve(mom, rank, settings.ridge)
    return dropped_curve(mom, rank, down_coefficients(site.down)[: site.hidden].T)


def allocate_widths(runner: Runner, sites: list[MlpSite], order: list[int], ks: list[int], criterion: str,
                    seed: int, settings: CalibrationSettings, progress: bool) -> tuple[list[int], list[float]]:
    """Per-layer widths spending the uniform ``ks``' parameters by measured error (on the
    original model), and each layer's estimated relative error at its new width."""
    curves: list[torch.Tensor] = [torch.zeros(0)] * len(sites)
    bar = tqdm(total=len(order), desc="allocate", unit="layer", disable=not progress, leave=False)
    for group in _groups(sites, order):
        moms = hidden_moments(runner, [sites[i] for i in group])
        for i in group:
            curves[i] = _error_curve(sites[i], moms.pop(sites[i].name), criterion, seed + i, settings)
            bar.update()
    bar.close()
    widths = spend(curves, [neuron_cost(s) for s in sites], ks, [s.hidden for s in sites],
                   [width_step(s) for s in sites], settings.allocate_floor, settings.allocate_ceiling)
    return widths, [float(c[k]) for c, k in zip(curves, widths)]


def _cut_one(runner: Runner, site: MlpSite, k: int, criterion: str, seed: int,
             settings: CalibrationSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    """Score, cut and (with compensation) refit one MLP; returns the kept indices and what the refit did.

    Without hidden norms the cut MLP's hidden layer is the kept columns of the original's, so
    one pass gives both the activations to score and the refit's statistics (a sub-block);
    a hidden norm renormalises after the cut, so then a second pass runs the cut MLP."""
    check_width(site, k)
    if k == site.hidden:  # nothing cut: the original MLP is its own best fit (and a bf16 fit would only add noise)
        return torch.arange(k), ({"rel_err_before": 0.0, "rel_err_after": 0.0, "refit": False}
                                 if settings.compensation else {})
    by_activations = criterion_scores(criterion) == "activations"
    sliceable = not site.norms
    mom = None
    if by_activations or (settings.compensation and sliceable):
        mom = hidden_moments(runner, [site])[site.name]
    acts = activation_rows(mom, site.down, settings.ridge) if by_activations else None
    w1, w_gate = site.scoring_weights()
    keep = select_neurons(w1, k, criterion, w_gate=w_gate, seed=seed, activations=acts)
    if not settings.compensation:
        shrink_mlp(site, keep)
        return keep, {}
    if sliceable:
        shrink_mlp(site, keep)
        return keep, refit_down(site, mom.sub(keep), settings.ridge)
    original = keep_original(site)
    shrink_mlp(site, keep)
    return keep, refit_down(site, pruned_moments(runner, site, original), settings.ridge)


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
        order = runner.forward_order(sites)
        estimates = None
        if settings.allocate == "global":
            ks, estimates = allocate_widths(runner, sites, order, ks, criterion, seed, settings, progress)
        done: dict[int, tuple[int, torch.Tensor, dict[str, Any]]] = {}
        for i in tqdm(order, desc=f"prune ({criterion}, calibrated)", unit="layer", disable=not progress, leave=False):
            h = sites[i].hidden
            with out_of_memory("calibrating it (its statistics, the cut and the refit)", 2 * _stat_bytes(sites[i]),
                               layer=sites[i].name):
                keep, info = _cut_one(runner, sites[i], ks[i], criterion, seed + i, settings)
            if estimates is not None:
                info["rel_err_estimate"] = estimates[i]
            done[i] = (h, keep, info)
    for i, site in enumerate(sites):
        h, keep, info = done[i]
        record.add(site, h, keep, **info)
    record.calibration = {"images": cal.images, "unreadable": cal.unreadable, "data": cal.description,
                          "compensate": settings.compensation,
                          "allocate": settings.allocate, "criterion": criterion, "ridge": settings.ridge,
                          "preprocess": pre.settings if cal.decoded else None, "device": device.type,
                          "precision": "bf16" if runner.bf16 else "fp32",
                          **({"floor": settings.allocate_floor, "ceiling": settings.allocate_ceiling}
                             if settings.allocate == "global" else {})}
