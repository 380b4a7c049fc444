"""Classification metrics shared by zero-shot and the linear probe, with clip_benchmark's
names and conventions: top-1, top-5 (None, not 1.0, with fewer than 5 classes: every
prediction would trivially be right) and mean per-class recall (sklearn's
``balanced_accuracy_score``: the recall of every class present in the labels, averaged)."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from ..core.errors import DgmrError

TOP5_MIN_CLASSES = 5


def mean_per_class_recall(labels: torch.Tensor, pred: torch.Tensor) -> float:
    """Recall averaged over the classes that occur in ``labels`` (classes only predicted are ignored)."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": ignored by definition
        return float(balanced_accuracy_score(labels.cpu().numpy(), pred.cpu().numpy()))


def classification_metrics(top: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """``top``: (N, k) class indices by decreasing score (k >= min(5, num_classes)).
    Returns ``{"top1", "top5", "mean_per_class_recall"}`` as fractions; top5 is None below 5 classes."""
    if len(top) != len(labels):
        raise DgmrError(f"{len(top)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise DgmrError("the evaluation split is empty")
    labels = labels.to(top.device).long()
    hit = top == labels[:, None]
    n = len(labels)  # counts / n in Python floats: a float32 mean would differ from clip_benchmark's in the 8th digit
    top5 = int(hit[:, :5].any(1).sum()) / n if num_classes >= TOP5_MIN_CLASSES else None
    return {"top1": int(hit[:, 0].sum()) / n, "top5": top5,
            "mean_per_class_recall": mean_per_class_recall(labels, top[:, 0])}


def top_indices(scores: torch.Tensor, k: int = 5) -> torch.Tensor:
    """The (N, min(k, C)) highest-scoring class indices of (N, C) ``scores``."""
    return scores.topk(min(k, scores.shape[1]), dim=1).indices
