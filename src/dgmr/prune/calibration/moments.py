"""float64 second moments of what the MLPs read and write on the calibration tokens,
gathered by hooks during the passes (never all activations at once)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...core.errors import DgmrError
from ...models.sites.attention import AttentionSite
from ...models.sites.mlp import MlpSite, Proj, matrix
from .runner import Hook, Pass, tokens_of


# ---------------------------------------------------------------------------------------------
# statistics
HALF = (torch.float16, torch.bfloat16)
# the sites whose output projection calibration refits: an MLP's down projection, an attention
# layer's output projection (both named ``down``)
Fitted = MlpSite | AttentionSite


def _operand(t: torch.Tensor) -> torch.Tensor:
    """A batch's activations as the moments multiply them: half precision as they are (their
    products are exact in float32), anything else in float64 (the refit and its error
    estimates read these sums where they cancel down to a small residual, which float32
    rounding would drown)."""
    return t if t.dtype in HALF else t.double()


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` into float64 ``out``: a float64 GEMM written in place, or for half
    operands a GEMM with float32 output (on CUDA the tensor-core one) added in."""
    if a.dtype == torch.float64:
        out.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            out += torch.mm(a, b, out_dtype=torch.float32)
            return
        except (RuntimeError, TypeError):  # a torch without the mixed-dtype GEMM: the float32 one
            pass
    out += a.float() @ b.float()


class Moments:
    """float64 second moments of regressors X (tokens, k) [+ a ones column for a bias] and
    targets Y (tokens, d): G = X^T X, C = X^T Y, and sum(Y^2).

    Each batch adds one GEMM per product, at the fast matrix product rate and summed into
    float64 across batches (:func:`_operand` says in which precision); the ones column is a
    column sum, never a copy of X."""

    def __init__(self, name: str, bias: bool) -> None:
        self.name, self.bias = name, bias
        self.G: torch.Tensor | None = None
        self.C: torch.Tensor | None = None
        self.yy: Any = 0.0
        self.tokens = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        n, k = x.shape
        b = int(self.bias)
        f64 = torch.float64
        with torch.autocast(x.device.type, enabled=False):
            x = _operand(x)
            if self.G is None:
                self.G = torch.zeros(k + b, k + b, dtype=f64, device=x.device)
            _add_product(self.G[:k, :k], x.T, x)
            if b:
                s = x.sum(0, dtype=f64)
                self.G[:k, k] += s
                self.G[k, :k] += s
                self.G[k, k] += n
            if y is not None:
                y = _operand(y)
                if self.C is None:
                    self.C = torch.zeros(k + b, y.shape[1], dtype=f64, device=x.device)
                _add_product(self.C[:k], x.T, y)
                if b:
                    self.C[k] += y.sum(0, dtype=f64)
                self.yy = self.yy + torch.linalg.vector_norm(y, dtype=f64).square()
        self.tokens += n

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


def moment_bytes(site: Fitted) -> int:
    """Bytes of the float64 moments of ``site`` over every input of its projection (with the bias column)."""
    rows, cols = matrix(site.down).shape
    return 8 * (cols + 1) * (cols + 1 + rows)


def moment_hooks(sites: list[Fitted], cols: dict[str, torch.Tensor] | None = None
                 ) -> tuple[list[Hook], dict[str, Moments]]:
    """Hooks that gather, for each of ``sites``, the moments of its hidden activations (what
    its down projection reads; only the columns ``cols[name]`` where given) against, as
    targets, the down projection's output."""
    moms = {s.name: Moments(s.name, s.down.bias is not None) for s in sites}
    hooks: list[Hook] = []
    for site in sites:
        h_in: list[torch.Tensor] = []
        take = None if cols is None or site.name not in cols else cols[site.name].to(site.down.weight.device)

        def take_in(_m: nn.Module, args: tuple, h_in=h_in, site=site, take=take) -> None:
            h = tokens_of(args[0], site.down)
            h_in.append(h if take is None else h.index_select(1, take))

        def take_out(_m: nn.Module, _args: tuple, out: torch.Tensor, h_in=h_in, site=site) -> None:
            moms[site.name].add(h_in.pop(), tokens_of(out, site.down))

        hooks += [(site.down, "pre", take_in), (site.down, "post", take_out)]
    return hooks, moms


def hidden_moments(run: Pass, sites: list[Fitted], cols: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, Moments]:
    """:func:`moment_hooks`' moments, gathered in one pass ``run`` to the last of ``sites``
    in forward order."""
    hooks, moms = moment_hooks(sites, cols)
    run(sites[-1].module, hooks, sites[-1].name)
    return {name: mom.check() for name, mom in moms.items()}


def pruned_moments(run: Pass, site: Fitted, original: Fitted) -> Moments:
    """Moments of the CUT ``site``'s hidden activations (after its own hidden norms) against the
    ORIGINAL MLP's down output on the same input: one pass to ``site``."""
    mom = Moments(site.name, site.down.bias is not None)
    target: list[torch.Tensor] = []

    def run_original(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        original.module(*args, **kwargs)  # its down hook below records the target

    def take_target(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        target.append(tokens_of(out, original.down))

    def take_hidden(_m: nn.Module, args: tuple) -> None:
        mom.add(tokens_of(args[0], site.down), target.pop())

    handle = original.down.register_forward_hook(take_target)
    try:
        run(site.module, [(site.module, "pre_kw", run_original), (site.down, "pre", take_hidden)], site.name)
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
