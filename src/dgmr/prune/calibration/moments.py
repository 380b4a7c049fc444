"""float64 second moments of what the MLPs read and write on the calibration tokens,
gathered by hooks during the runner's passes (never all activations at once)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ...core.errors import DgmrError
from ...models.sites.mlp import MlpSite, Proj, matrix
from .runner import Runner, tokens_of


# ---------------------------------------------------------------------------------------------
# statistics
class Moments:
    """float64 second moments of regressors X (tokens, k) [+ a ones column for a bias] and
    targets Y (tokens, d): G = X^T X, C = X^T Y, and sum(Y^2)."""

    def __init__(self, name: str, bias: bool) -> None:
        self.name, self.bias = name, bias
        self.G: torch.Tensor | None = None
        self.C: torch.Tensor | None = None
        self.yy = 0.0
        self.tokens = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        x = x.double()
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        g = x.T @ x
        self.G = g if self.G is None else self.G.add_(g)
        if y is not None:
            y = y.double()
            c = x.T @ y
            self.C = c if self.C is None else self.C.add_(c)
            self.yy += (y * y).sum()
        self.tokens += x.shape[0]

    def check(self) -> "Moments":
        """Refuse statistics that saw NaN or inf (any non-finite activation reaches the sums)."""
        self.yy = float(self.yy)
        if not (torch.isfinite(self.G).all() and (self.C is None or torch.isfinite(self.C).all())
                and math.isfinite(self.yy)):
            raise DgmrError(f"{self.name}: non-finite activations on the calibration images (NaN or inf in the "
                            "model's forward); nothing was written")
        return self

    def sub(self, keep: torch.Tensor) -> "Moments":
        """The moments of the regressors ``keep`` only (the bias column stays)."""
        assert self.G is not None and self.C is not None
        h = self.G.shape[0] - self.bias
        idx = keep.to(self.G.device)
        if self.bias:
            idx = torch.cat([idx, torch.tensor([h], device=idx.device)])
        out = Moments(self.name, self.bias)
        out.G, out.C, out.yy, out.tokens = self.G[idx][:, idx], self.C[idx], self.yy, self.tokens
        return out

    def error(self, wt: torch.Tensor) -> float:
        """||X wt - Y||^2 for a (k[+1], d) coefficient matrix ``wt``, from the moments alone."""
        assert self.G is not None and self.C is not None
        return max(float((wt * (self.G @ wt)).sum() - 2 * (wt * self.C).sum()) + self.yy, 0.0)


def hidden_moments(runner: Runner, sites: list[MlpSite], bias: bool | None = None) -> dict[str, Moments]:
    """For each of ``sites``: moments of its hidden activations (what its down projection
    reads) against, as targets, the down projection's output; one pass, to the last of them
    in forward order. ``bias``: append a ones column (default: where the down projection has a bias)."""
    moms = {s.name: Moments(s.name, s.down.bias is not None if bias is None else bias) for s in sites}
    hooks: list[tuple[nn.Module, str, Callable]] = []
    for site in sites:
        h_in: list[torch.Tensor] = []

        def take_in(_m: nn.Module, args: tuple, h_in=h_in, site=site) -> None:
            h_in.append(tokens_of(args[0], site.down))

        def take_out(_m: nn.Module, _args: tuple, out: torch.Tensor, h_in=h_in, site=site) -> None:
            moms[site.name].add(h_in.pop(), tokens_of(out, site.down))

        hooks += [(site.down, "pre", take_in), (site.down, "post", take_out)]
    runner.run_to(sites[-1], hooks)
    return {name: mom.check() for name, mom in moms.items()}


def pruned_moments(runner: Runner, site: MlpSite, original: MlpSite) -> Moments:
    """Moments of the CUT ``site``'s hidden activations (after its own hidden norms) against the
    ORIGINAL MLP's down output on the same input: one pass to ``site``."""
    mom = Moments(site.name, site.down.bias is not None)
    target: list[torch.Tensor] = []

    def run_original(_m: nn.Module, args: tuple) -> None:
        original.module(*args)  # its down hook below records the target

    def take_target(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        target.append(tokens_of(out, original.down))

    def take_hidden(_m: nn.Module, args: tuple) -> None:
        mom.add(tokens_of(args[0], site.down), target.pop())

    handle = original.down.register_forward_hook(take_target)
    try:
        runner.run_to(site, [(site.module, "pre", run_original), (site.down, "pre", take_hidden)])
    finally:
        handle.remove()
    return mom.check()


def activation_rows(mom: Moments, down: Proj, ridge: float) -> torch.Tensor:
    """Rows whose inner products are the neurons' activation inner products over the
    calibration tokens, each scaled by its down-projection column norm (what the neuron
    writes): greedy Gram-Schmidt on them is pivoted Cholesky of that weighted Gram matrix.
    The ridge keeps the factorisation defined when there are fewer tokens than neurons."""
    assert mom.G is not None
    scale = torch.linalg.vector_norm(matrix(down).detach().double(), dim=0).to(mom.G.device)
    h = scale.numel()
    g = mom.G[:h, :h] * scale[:, None] * scale[None, :]
    g.diagonal().add_(max(ridge, 1e-10) * float(g.diagonal().mean()) + torch.finfo(g.dtype).tiny)
    chol, info = torch.linalg.cholesky_ex(g)
    if info:
        raise DgmrError(f"{mom.name}: the activations' Gram matrix is not positive definite (raise --ridge)")
    return chol
