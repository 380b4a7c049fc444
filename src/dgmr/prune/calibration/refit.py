"""The least-squares refit of a cut MLP's down projection (weight and bias), ridge towards the
original weights; kept as it was, with a warning, when the solve does not help."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ...models.sites.attention import AttentionSite
from ...models.sites.mlp import MlpSite, Proj, matrix
from .moments import Fitted, Moments, pruned_moments
from .runner import Pass
from .settings import CalibrationWarning


# ---------------------------------------------------------------------------------------------
# the refit
def down_coefficients(down: Proj) -> torch.Tensor:
    """The down projection as a (k[+1], d) coefficient matrix on [hidden, 1]."""
    w = matrix(down).detach().double().T
    if down.bias is not None:
        w = torch.cat([w, down.bias.detach().double()[None]], dim=0)
    return w


def _set_down(down: Proj, wt: torch.Tensor) -> None:
    k = matrix(down).shape[1]
    w = wt[:k].T.reshape(down.weight.shape).to(down.weight.dtype)
    with torch.no_grad():
        down.weight.copy_(w.to(down.weight.device))
        if down.bias is not None:
            down.bias.copy_(wt[k].to(down.bias.dtype).to(down.bias.device))


def refit_down(site: Fitted, mom: Moments, ridge: float) -> dict[str, Any]:
    """Least-squares refit of ``site.down`` (weight and bias) on ``mom``, ridge towards the
    current weights; keeps them (with a warning) when the solve is unusable. Returns the
    relative output errors before and after."""
    assert mom.G is not None and mom.C is not None
    w0 = down_coefficients(site.down).to(mom.G.device)
    k = matrix(site.down).shape[1]
    yy = mom.yy or 1.0
    before = mom.error(w0)
    info: dict[str, Any] = {"rel_err_before": before / yy, "tokens": mom.tokens}
    if mom.tokens < k:
        unit = "head channels" if isinstance(site, AttentionSite) else "neurons"
        warnings.warn(f"{site.name}: {mom.tokens} calibration tokens for {k} kept {unit}: the refit is "
                      "underdetermined and the ridge decides the rest (use more --calibration-images)",
                      CalibrationWarning, stacklevel=3)
    lam = ridge * float(mom.G.diagonal()[:k].mean())
    a = mom.G.clone()
    a.diagonal().add_(lam)
    chol, bad = torch.linalg.cholesky_ex(a)
    wt = torch.cholesky_solve(mom.C + lam * w0, chol) if not bad else None
    after = mom.error(wt) if wt is not None and torch.isfinite(wt).all() else math.inf
    if not after <= before * (1 + 1e-9) + 1e-12 * yy:
        warnings.warn(f"{site.name}: the least-squares refit is ill-conditioned here; keeping the original down "
                      "weights (try a larger --ridge)", CalibrationWarning, stacklevel=3)
        info.update(rel_err_after=before / yy, refit=False)
        return info
    _set_down(site.down, wt)
    info.update(rel_err_after=after / yy, refit=True)
    return info


def keep_original(site: MlpSite) -> MlpSite:
    """A detached copy of ``site``'s MLP (before its cut): the reference the refit aims at."""
    module = copy.deepcopy(site.module)
    names = {id(m): n for n, m in site.module.named_modules()}
    twins = dict(module.named_modules())

    def twin(m: nn.Module | None) -> Any:
        return None if m is None else twins[names[id(m)]]

    return MlpSite(site.name, module, site.kind, twin(site.up), twin(site.down), twin(site.gate), site.packed,
                   [twin(n) for n in site.norms])


def cut_and_refit(run: Pass, site: Any, keep: torch.Tensor, mom: Moments | None, settings: Any,
                  shrink: Callable[[Any, torch.Tensor], Any], original_of: Callable[[Any], Any]) -> dict[str, Any]:
    """Cut ``site`` to ``keep`` with its kind's ``shrink`` and, with compensation, refit its
    projection: on ``mom`` (the kept inputs' moments, from a pass before the cut), or, where
    the cut changes what the kept inputs are (a norm over the cut width renormalises), on a
    pass that runs the cut layer beside ``original_of(site)``, a copy made before the cut.
    Returns what the refit did ({} without compensation)."""
    if not settings.compensation or mom is not None:
        with torch.no_grad():
            shrink(site, keep)
        return refit_down(site, mom, settings.ridge) if settings.compensation else {}
    original = original_of(site)
    with torch.no_grad():
        shrink(site, keep)
    return refit_down(site, pruned_moments(run, site, original), settings.ridge)
