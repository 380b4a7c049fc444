"""Linear probe: multinomial logistic regression on frozen features, in torch.

Two protocols. ``lbfgs`` (dgmr's, the default):

Features are standardised with training statistics; the L2 penalty is picked on a held-out
part of the training split (stratified), then the classifier is refit on the whole
training split and scored on the test split. The optimiser is full-batch L-BFGS whose
closure walks the data in chunks, so memory stays bounded for an ImageNet-sized bank and
the same code runs on CPU and GPU.

``clip_benchmark`` (:func:`clip_benchmark_probe`, in :mod:`.linear_cb`): clip_benchmark's recipe,
on CPU or GPU.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import DgmrError
from .knn import check_features
from .metrics import classification_metrics, top_indices

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PROTOCOLS = ("lbfgs", "clip_benchmark")


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held_out): about ``fraction`` of every class with >= 2 samples is held out."""
    if not 0 < fraction < 1:
        raise DgmrError(f"held-out fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    labels = labels.cpu()
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        h = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) >= 2 else 0
        held.append(idx[:h])
        fit.append(idx[h:])
    fit_i, held_i = torch.cat(fit).sort().values, torch.cat(held).sort().values
    if len(held_i) == 0:
        raise DgmrError("the training split is too small to hold out a validation part (need >= 2 images per class)")
    return fit_i, held_i


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, *,
               max_iter: int = 200, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + weight_decay/2 * ||W||^2 with L-BFGS; returns (W, b)."""
    w = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)
    n = len(x)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), device=x.device)
        for s in range(0, n, chunk):
            loss = F.cross_entropy(x[s:s + chunk] @ w.T + b, y[s:s + chunk], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        reg = 0.5 * weight_decay * (w * w).sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    return w.detach(), b.detach()


@torch.no_grad()
def _top(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N, min(5, C)) best classes of the linear classifier (w, b), chunk by chunk."""
    return torch.cat([top_indices(x[s:s + chunk] @ w.T + b) for s in range(0, len(x), chunk)])


def _scores(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    return classification_metrics(_top(x, w, b), y, len(b))


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Fit a linear classifier on ``train_feats`` and score ``test_feats``.

    Returns ``{"top1", "top5", "mean_per_class_recall", "weight_decay" (the chosen one),
    "val_top1": {wd: acc}, ...}`` (accuracies are fractions in [0, 1]; top5 None below 5 classes)."""
    check_features(train_feats, train_labels, test_feats, test_labels)
    if not weight_decays or any(not wd >= 0 for wd in weight_decays):
        raise DgmrError(f"weight decays must be >= 0, got {list(weight_decays)}")
    device = torch.device(device) if device is not None else train_feats.device
    xtr = train_feats.to(device, torch.float32)
    xte = test_feats.to(device, torch.float32)
    ytr = train_labels.to(device, torch.long)
    yte = test_labels.to(device, torch.long)
    c = int(num_classes) if num_classes else int(max(ytr.max(), yte.max())) + 1
    fit_i, held_i = stratified_split(ytr, val_fraction, seed)
    fit_i, held_i = fit_i.to(device), held_i.to(device)

    def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
        mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6)
        return [(t - mean) / std for t in (train, *others)]

    xf, xh = standardize(xtr[fit_i], xtr[held_i])
    val = {}
    for wd in weight_decays:
        w, b = fit_logreg(xf, ytr[fit_i], c, float(wd), max_iter=max_iter)
        val[float(wd)] = _scores(xh, ytr[held_i], w, b)["top1"]
    best = max(val, key=lambda wd: (val[wd], wd))  # ties: the stronger penalty
    xa, xt = standardize(xtr, xte)
    w, b = fit_logreg(xa, ytr, c, best, max_iter=max_iter)
    scores = _scores(xt, yte, w, b)
    train_top1 = _scores(xa, ytr, w, b)["top1"]
    return {"metric": "linear", "protocol": "lbfgs", **scores, "weight_decay": best,
            "val_top1": {f"{wd:g}": acc for wd, acc in val.items()}, "train_top1": train_top1,
            "n_train": len(xtr), "n_held_out": len(held_i), "n_test": len(xte), "num_classes": c}
