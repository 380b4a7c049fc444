"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Features are L2-normalised, similarity is cosine, each of the k nearest training samples
votes for its class with weight exp(sim / T), T = 0.07. The test set is processed in
chunks and the training bank is scanned in chunks with a running top-k merge, so a
1.28M x 1536 bank (fp16, 3.9 GB) fits; the same code runs on CPU and GPU.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import DgmrError
from .metrics import TOP5_MIN_CLASSES

DEFAULT_KS = (10, 20, 100, 200)


def check_features(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
           test_labels: torch.Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise DgmrError("features must be 2-D (samples x dims)")
    if len(train_feats) == 0:
        raise DgmrError("the training split is empty")
    if len(test_feats) == 0:
        raise DgmrError("the evaluation split is empty")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise DgmrError(f"train features have {train_feats.shape[1]} dims, test features {test_feats.shape[1]}")
    if len(train_labels) != len(train_feats) or len(test_labels) != len(test_feats):
        raise DgmrError("features and labels differ in length")


def normalize_bank(feats: torch.Tensor, device: torch.device, chunk: int = 65536,
                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """L2-normalise rows chunk by chunk (in fp32) into a ``dtype`` matrix on ``device``."""
    out = torch.empty(feats.shape, dtype=dtype, device=device)
    for s in range(0, len(feats), chunk):
        out[s:s + chunk] = F.normalize(feats[s:s + chunk].to(device, torch.float32), dim=1).to(dtype)
    return out


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    test_chunk: int = 1024,
    train_chunk: int = 65536,
) -> dict[str, Any]:
    """kNN top-1/top-5 for every k in ``ks``.

    Returns ``{"per_k": {"10": {"top1", "top5"}, ...}, "best_k", "top1", "top5", ...}`` where
    ``top1``/``top5`` are those of the k with the best top-1 (fractions in [0, 1]). A k larger
    than the training set is clamped to its size (reported in ``per_k`` under the asked k)."""
    check_features(train_feats, train_labels, test_feats, test_labels)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise DgmrError(f"k must be >= 1, got {ks}")
    if not temperature > 0:
        raise DgmrError(f"temperature must be > 0, got {temperature}")
    device = torch.device(device) if device is not None else train_feats.device
    compute_dtype = torch.float32 if device.type == "cpu" else torch.float16
    n_train = len(train_feats)
    train_labels = train_labels.to(device, torch.long)
    test_labels = test_labels.to(device, torch.long)
    c = int(num_classes) if num_classes else int(max(train_labels.max(), test_labels.max())) + 1
    max_k = min(ks[-1], n_train)
    bank = normalize_bank(train_feats, device)
    correct = {k: [0, 0] for k in ks}
    for s in range(0, len(test_feats), test_chunk):
        q = F.normalize(test_feats[s:s + test_chunk].to(device, torch.float32), dim=1).to(compute_dtype)
        y = test_labels[s:s + test_chunk]
        best_v = torch.empty(len(q), 0, device=device)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=device)
        for t in range(0, n_train, train_chunk):
            sim = (q @ bank[t:t + train_chunk].to(compute_dtype).T).float()
            v, i = sim.topk(min(max_k, sim.shape[1]), dim=1)
            v, j = torch.cat([best_v, v], 1).topk(min(max_k, best_v.shape[1] + v.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + t], 1).gather(1, j)
            best_v = v
        weights = (best_v / temperature).exp()
        neighbour_labels = train_labels[best_i]
        for k in ks:
            kk = min(k, max_k)
            votes = torch.zeros(len(q), c, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            pred = votes.topk(min(5, c), dim=1).indices
            hit = pred == y[:, None]
            correct[k][0] += int(hit[:, 0].sum())
            correct[k][1] += int(hit.any(1).sum())
    n = len(test_feats)
    per_k = {str(k): {"top1": correct[k][0] / n, "top5": correct[k][1] / n if c >= TOP5_MIN_CLASSES else None}
             for k in ks}
    best_k = max(ks, key=lambda k: (per_k[str(k)]["top1"], -k))
    return {"metric": "knn", "per_k": per_k, "best_k": best_k, "top1": per_k[str(best_k)]["top1"],
            "top5": per_k[str(best_k)]["top5"], "temperature": temperature, "n_train": n_train,
            "n_test": n, "num_classes": c}
