"""Calibrated pruning: statistics of a few hundred unlabeled images decide and repair the cut.

With calibration images, :func:`dgmr.prune` runs the model over them and, for every MLP in
forward order (docs/calibration.md):

* an activation criterion (``diversity-act``) scores the neurons on their activations over
  the calibration tokens instead of on the fc1 weights;
* **compensation** refits the down projection (weight and bias) of the cut MLP by least
  squares, so that its output best reproduces the original MLP's output on the same input.
  Inputs come from the blocks before, already cut and refitted, so errors do not compound.

Statistics are second moments accumulated in float64 over batches (never all activations).
The solve is ridge-regularised *towards the original down weights*: with nothing cut the
original weights are the exact solution, and where the data say little (fewer tokens than
kept neurons) the weights stay near the original instead of shrinking to zero.

:mod:`.allocate` uses the same statistics to spend the parameter budget across layers.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import DgmrError, first_line
from .mlp import MlpSite, Proj, matrix

ALLOCATIONS = ("uniform", "global")
PRECISIONS = ("auto", "bf16", "fp32")


class CalibrationWarning(UserWarning):
    """Calibration went on, but with less than it asked for (few tokens, an unsolvable layer)."""


def _setting(default: Any, help: str, **cli: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclass
class CalibrationSettings:
    """How calibration runs; the fields are ``dgmr prune``'s calibration flags and the
    keywords ``dgmr.prune(..., calibration=DATA, **settings)`` takes."""

    images: int = _setting(256, "calibration images to use (a seeded sample of DATA)",
                           flag="--calibration-images", metavar="N")
    compensate: bool = _setting(True, "refit every cut MLP's down projection by least squares to the original "
                                      "MLP's output", flag="--no-compensation")
    allocate: str = _setting("uniform", "uniform: the requested width in every MLP; global: the same total MLP "
                                        "parameters spread across layers by measured reconstruction error",
                             choices=ALLOCATIONS)
    ridge: float = _setting(1e-4, "ridge of the refit, relative to the mean diagonal of the activations' Gram "
                                  "matrix (pulls towards the original weights)", metavar="R")
    floor: float = _setting(0.5, "with --allocate global: no MLP narrower than this times the uniform width",
                            flag="--allocate-floor", metavar="F")
    ceiling: float = _setting(2.0, "with --allocate global: no MLP wider than this times the uniform width "
                                   "(nor its original width)", flag="--allocate-ceiling", metavar="F")
    batch_size: int = _setting(32, "calibration batch size", flag="--calibration-batch-size", metavar="B")
    device: str = _setting("auto", "where the calibration forward runs (auto: cuda when available)",
                           flag="--calibration-device")
    precision: str = _setting("auto", "the calibration forward's precision (auto: bf16 autocast on GPUs, fp32 on the "
                                      "CPU); statistics are float64 either way", flag="--calibration-precision",
                              choices=PRECISIONS)

    def __post_init__(self) -> None:
        if not (isinstance(self.images, int) and self.images > 0):
            raise DgmrError(f"calibration images must be a positive integer, got {self.images!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise DgmrError(f"calibration batch size must be a positive integer, got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise DgmrError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.allocate not in ALLOCATIONS:
            raise DgmrError(f"allocate must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}")
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise DgmrError(f"ridge must be a finite number >= 0, got {self.ridge}")
        if not (0 < self.floor <= 1 <= self.ceiling and math.isfinite(self.ceiling)):
            raise DgmrError(f"allocation bounds need 0 < floor <= 1 <= ceiling (finite), got floor {self.floor}, "
                            f"ceiling {self.ceiling}")


# ---------------------------------------------------------------------------------------------
# calibration data
class _EvalTransform:
    """Adapts the model's eval transform to the distillation datasets' (image, generator) call."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.transform(img)


@dataclass
class CalibrationData:
    """Preprocessed calibration batches, kept in memory: every layer's pass reads them again."""

    batches: list[torch.Tensor]
    unreadable: int = 0
    description: str = ""
    decoded: bool = False  # decoded here with the model's eval transform (not handed in preprocessed)

    @property
    def images(self) -> int:
        return sum(b.shape[0] for b in self.batches)


def _batched(tensors: Iterable[torch.Tensor], n: int, batch_size: int) -> list[torch.Tensor]:
    """Up to ``n`` images from an iterable of (B, 3, H, W) or (3, H, W) tensors, re-batched."""
    pending: list[torch.Tensor] = []
    taken = 0
    for t in tensors:
        t = t[None] if t.ndim == 3 else t
        if t.ndim != 4:
            raise DgmrError(f"calibration tensors must be (B, 3, H, W) image batches, got shape {tuple(t.shape)}")
        t = t[: n - taken]
        pending.append(t.float())
        taken += t.shape[0]
        if taken >= n:
            break
    return list(torch.cat(pending).split(batch_size)) if pending else []


def _from_loader(loader: Iterable, n: int, batch_size: int) -> list[torch.Tensor]:
    """Batches a user's DataLoader (already preprocessed) yields; (images, labels) pairs are fine."""
    return _batched((_images_of(b) for b in loader), n, batch_size)


def _images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a loader's batch: itself, the first of a tuple, or a dict's
    ``pixel_values``/``image``/``images`` (Hugging Face and WebDataset conventions)."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        key = next((k for k in ("pixel_values", "image", "images") if k in batch), None)
        if key is None:
            raise DgmrError(f"a calibration batch is a dict without pixel_values/image/images (keys: {sorted(batch)})")
        batch = batch[key]
    if not isinstance(batch, torch.Tensor):
        raise DgmrError(f"a calibration batch is a {type(batch).__name__}, not an image tensor")
    return batch


def _decode(source: Any, transform: _EvalTransform, n: int, seed: int) -> tuple[list[torch.Tensor], int]:
    """Decode ``n`` readable images of a resolved ``--data`` source (a seeded sample of files,
    or the first ones of shards); returns (images, unreadable count)."""
    from ..distill.data import ImageDataset, ShardImages

    if source.kind == "shards":  # an endless stream: at most one pass over it
        limit = source.num_samples if source.num_samples is not None else 10 * n
        samples = itertools.islice(ShardImages(source.items, transform, seed=seed), limit)
    else:
        ds = ImageDataset(source.items, transform, seed=seed)
        samples = (ds[i] for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist())
    images: list[torch.Tensor] = []
    bad = 0
    for x, _name in samples:
        if x is None:
            bad += 1
            continue
        images.append(x)
        if len(images) >= n:
            break
    return images, bad


def calibration_data(data: Any, transform: Callable, settings: CalibrationSettings, *, seed: int = 0) -> CalibrationData:
    """Resolve calibration ``data``: what ``dgmr distill --data`` takes (a folder, a list file,
    WebDataset shards, a list of PIL images or paths, or a Dataset), decoded with
    ``transform``; or already preprocessed images (a (N, 3, H, W) tensor, a list of image
    tensors, a DataLoader or an iterable of batches)."""
    n, bs = settings.images, settings.batch_size
    if isinstance(data, CalibrationData):
        cal = data
    elif isinstance(data, torch.Tensor):
        cal = CalibrationData(_batched([data], n, bs), 0, f"a tensor of {data.shape[0]} images")
    elif isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        cal = CalibrationData(_batched(data, n, bs), 0, f"{len(data)} tensors")
    elif isinstance(data, torch.utils.data.DataLoader) or (
            isinstance(data, Iterable) and not isinstance(data, (str, bytes, list, tuple))
            and not isinstance(data, torch.utils.data.Dataset) and not hasattr(data, "__fspath__")):
        cal = CalibrationData(_from_loader(data, n, bs), 0, "a data loader")
    else:
        from ..distill.data import resolve_data

        source = resolve_data(data)
        images, bad = _decode(source, _EvalTransform(transform), n, seed)
        if not images:
            raise DgmrError(f"no readable calibration image in {source.description} ({bad} unreadable)")
        cal = CalibrationData(list(torch.stack(images).split(bs)), bad, source.description, decoded=True)
    if not cal.batches:
        raise DgmrError(f"no calibration images in {cal.description or 'the calibration data'}")
    return cal


# ---------------------------------------------------------------------------------------------
# running the model up to one MLP
class _Stop(BaseException):
    """Raised by a hook once the MLP being calibrated has run: the rest of the forward is not
    needed. A BaseException, so that a model's own ``except Exception`` does not swallow it."""


def _tokens(t: torch.Tensor, proj: Proj) -> torch.Tensor:
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
            h_in.append(_tokens(args[0], site.down))

        def take_out(_m: nn.Module, _args: tuple, out: torch.Tensor, h_in=h_in, site=site) -> None:
            moms[site.name].add(h_in.pop(), _tokens(out, site.down))

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
        target.append(_tokens(out, original.down))

    def take_hidden(_m: nn.Module, args: tuple) -> None:
        mom.add(_tokens(args[0], site.down), target.pop())

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


# ---------------------------------------------------------------------------------------------
# the refit
def _down_coefficients(down: Proj) -> torch.Tensor:
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


def refit_down(site: MlpSite, mom: Moments, ridge: float) -> dict[str, Any]:
    """Least-squares refit of ``site.down`` (weight and bias) on ``mom``, ridge towards the
    current weights; keeps them (with a warning) when the solve is unusable. Returns the
    relative output errors before and after."""
    assert mom.G is not None and mom.C is not None
    w0 = _down_coefficients(site.down).to(mom.G.device)
    k = matrix(site.down).shape[1]
    yy = mom.yy or 1.0
    before = mom.error(w0)
    info: dict[str, Any] = {"rel_err_before": before / yy, "tokens": mom.tokens}
    if mom.tokens < k:
        warnings.warn(f"{site.name}: {mom.tokens} calibration tokens for {k} kept neurons: the refit is "
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
