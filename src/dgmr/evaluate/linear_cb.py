"""clip_benchmark's linear-probe recipe (``dgmr eval linear --protocol clip_benchmark``),
reproduced from its published behaviour, on CPU or GPU:

* features L2-normalised;
* an ``nn.Linear`` trained with AdamW (lr 0.1), cross-entropy, batches of 64 reshuffled
  every epoch, a per-step cosine learning-rate schedule without warm-up, 10 epochs, the
  seed set before the layer is built;
* the weight decay searched on a held-out part of the training split over
  ``logspace(-6, 2, 97)``: first every 16th value (7 points), then around the best with spans
  8, 4, 2, 1 (left, best, right each time); a strictly better validation top-1 wins, so ties
  keep the earlier candidate, and when none beats 0 the first grid value is kept;
* the classifier retrained with that weight decay on training + held-out, scored on the
  test split. Without a held-out part (``val_fraction=0``), weight decay 0 on the whole
  training split, as clip_benchmark does without a validation split.

clip_benchmark holds out with ``random_split``; here the split is a seeded random
permutation (not stratified), so the chosen weight decay can differ on small data.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import DgmrError
from .knn import check_features
from .metrics import classification_metrics, top_indices

GRID = np.logspace(-6, 2, 97).tolist()  # numpy's, as clip_benchmark: torch's differs in the last bits
FIRST_STEP = 16
SPANS = (8, 4, 2, 1)


def train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, *, lr: float = 0.1,
                epochs: int = 10, batch_size: int = 64, seed: int = 0) -> torch.nn.Linear:
    """One clip_benchmark probe training run on features ``x`` (already normalised)."""
    with torch.random.fork_rng(devices=[]):  # the layer's init is seeded, the caller's RNG left alone
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x.shape[1], num_classes)
    probe = probe.to(x.device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(x) / batch_size)
    steps = epochs * per_epoch
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(per_epoch):
            for group in opt.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * (epoch * per_epoch + i) / steps)) * lr
            idx = order[i * batch_size:(i + 1) * batch_size]
            opt.zero_grad()
            F.cross_entropy(probe(x[idx]), y[idx]).backward()
            opt.step()
    return probe


@torch.no_grad()
def _val_top1(probe: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((probe(x).argmax(1) == y).float().mean())


def search_weight_decay(fit: tuple[torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor],
                        num_classes: int, **train: Any) -> tuple[float, dict[str, float]]:
    """(chosen weight decay, {weight decay: held-out top-1} of every run) by clip_benchmark's search."""
    tried: dict[int, float] = {}

    def peak(candidates: list[int]) -> int:
        best, best_acc = 0, 0.0
        for i in candidates:
            if i not in tried:  # the same training run again would give the same number
                tried[i] = _val_top1(train_probe(*fit, num_classes, GRID[i], **train), *held)
            if best_acc < tried[i]:
                best, best_acc = i, tried[i]
        return best

    idx = peak(list(range(0, len(GRID), FIRST_STEP)))
    for span in SPANS:
        idx = peak([max(idx - span, 0), idx, min(idx + span, len(GRID) - 1)])
    return GRID[idx], {f"{GRID[i]:.6g}": acc for i, acc in sorted(tried.items())}


def clip_benchmark_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                         test_labels: torch.Tensor, *, val_fraction: float = 0.2, seed: int = 0, lr: float = 0.1,
                         epochs: int = 10, batch_size: int = 64, num_classes: int | None = None,
                         device: str | torch.device | None = None) -> dict[str, Any]:
    """clip_benchmark's linear probe (see the module docstring); the result has dgmr's
    fields (top1, top5, mean_per_class_recall, ...) and ``protocol: "clip_benchmark"``."""
    check_features(train_feats, train_labels, test_feats, test_labels)
    if not 0 <= val_fraction < 1:
        raise DgmrError(f"held-out fraction must be in [0, 1), got {val_fraction}")
    if lr <= 0 or epochs < 1 or batch_size < 1:
        raise DgmrError("the learning rate must be > 0, epochs and batch size >= 1")
    device = torch.device(device) if device is not None else train_feats.device
    xtr = F.normalize(train_feats.to(device, torch.float32), dim=-1)
    xte = F.normalize(test_feats.to(device, torch.float32), dim=-1)
    ytr, yte = train_labels.to(device, torch.long), test_labels.to(device, torch.long)
    c = int(num_classes) if num_classes else int(max(ytr.max(), yte.max())) + 1
    train = dict(lr=lr, epochs=epochs, batch_size=batch_size, seed=seed)
    n_held = min(len(xtr) - 1, max(1, round(val_fraction * len(xtr)))) if val_fraction > 0 else 0
    val: dict[str, float] = {}
    wd = 0.0
    if n_held:
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed)).to(device)
        held_i, fit_i = perm[:n_held], perm[n_held:]
        wd, val = search_weight_decay((xtr[fit_i], ytr[fit_i]), (xtr[held_i], ytr[held_i]), c, **train)
    probe = train_probe(xtr, ytr, c, wd, **train)  # training + held-out together, as clip_benchmark retrains
    with torch.no_grad():
        scores = classification_metrics(top_indices(probe(xte)), yte, c)
    return {"metric": "linear", "protocol": "clip_benchmark", **scores, "weight_decay": wd, "val_top1": val,
            "lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed, "normalized": True,
            "n_train": len(xtr), "n_held_out": n_held, "n_test": len(xte), "num_classes": c}
