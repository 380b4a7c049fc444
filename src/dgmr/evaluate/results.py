"""Result files readable by dgmr and by clip_benchmark.

Every result dgmr writes carries clip_benchmark's top-level fields beside its own: ``dataset``,
``model``, ``pretrained``, ``task``, ``metrics`` (clip_benchmark's key names) and
``language``, so ``clip_benchmark build`` tables it. ``model`` stays dgmr's label (a spec or a
directory), which is what ``dgmr report`` keys rows on; ``pretrained`` is the pretrained tag
(``random-init`` for random weights). :func:`from_clip_benchmark` turns clip_benchmark's own
result files into dgmr's form so that ``dgmr report`` can put them beside a pruned model.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..core.errors import DgmrError

TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "linear": "linear_probe",
         "knn": "knn", "speed": "speed"}
SPLIT_NAMES = {"val", "test", "train", "validation", "images", "data"}


def dataset_name(path: str | None) -> str:
    """A data path's dataset name: the folder (or file stem), its parent for split names (val, test ...)."""
    if not path:
        return ""
    p = Path(path)
    name = p.stem if p.is_file() else p.name
    if name.lower() in SPLIT_NAMES and p.parent.name:
        name = p.parent.name
    return name


def _nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    m = result.get("metric")
    if m == "zeroshot":
        return {"acc1": result["top1"], "acc5": result.get("top5"),
                "mean_per_class_recall": result.get("mean_per_class_recall")}
    if m == "linear":
        return {"lp_acc1": result["top1"], "lp_acc5": result.get("top5"),
                "lp_mean_per_class_recall": result.get("mean_per_class_recall"),
                "weight_decay": result.get("weight_decay"), "protocol": result.get("protocol", "lbfgs")}
    if m == "knn":
        return {"acc1": result["top1"], "acc5": result.get("top5"), "k": result.get("best_k")}
    if m == "retrieval":
        out = {}
        for key, v in result["text_to_image"].items():  # clip_benchmark: image retrieval = text -> image
            out[f"image_retrieval_recall@{key.removeprefix('R@')}"] = v
        for key, v in result["image_to_text"].items():
            out[f"text_retrieval_recall@{key.removeprefix('R@')}"] = v
        return out
    if m == "speed":
        return {f"{name} images/s": row.get("throughput") for name, row in result.get("models", {}).items()}
    return {}


def with_clip_benchmark_fields(result: dict[str, Any], *, dataset: str | None = None, pretrained: str | None = None,
                               language: str = "en") -> dict[str, Any]:
    """``result`` with clip_benchmark's top-level fields added (dgmr's own fields unchanged)."""
    data = result.get("val") or result.get("data") or result.get("captions")
    model = result.get("model")
    if model is None and result.get("metric") == "speed":
        model = " vs ".join(result.get("models", {}))
    return {**result, "dataset": dataset or result.get("dataset") or dataset_name(data), "model": model,
            "pretrained": pretrained if pretrained is not None else result.get("pretrained", ""),
            "task": TASKS.get(result.get("metric"), result.get("metric")), "metrics": _metrics(result),
            "language": language}


def is_clip_benchmark(d: dict[str, Any]) -> bool:
    """A clip_benchmark result (and not one dgmr wrote, which has ``metric`` too)."""
    return "metric" not in d and isinstance(d.get("metrics"), dict) and "task" in d


def from_clip_benchmark(d: dict[str, Any], origin: str) -> dict[str, Any] | None:
    """A clip_benchmark result as a dgmr result (None for tasks dgmr does not table, e.g. captioning)."""
    if "model" not in d:
        raise DgmrError(f"{origin}: a clip_benchmark result without a 'model' field")
    m, task = d["metrics"], d.get("task")
    label = f"{d['model']} {d.get('pretrained') or ''}".strip()
    base = {"model": label, "role": "original", "dataset": str(d.get("dataset") or ""), "source_format": "clip_benchmark"}
    if task in ("zeroshot_classification", "linear_probe"):
        p = "lp_" if task == "linear_probe" and "lp_acc1" in m else ""
        if f"{p}acc1" not in m:
            return None  # multi-label datasets report mean average precision only
        proto = {} if task == "zeroshot_classification" else {"protocol": "clip_benchmark"}
        return {**base, **proto, "metric": "zeroshot" if task == "zeroshot_classification" else "linear",
                "top1": m[f"{p}acc1"], "top5": _nan_to_none(m.get(f"{p}acc5")),
                "mean_per_class_recall": _nan_to_none(m.get(f"{p}mean_per_class_recall"))}
    if task == "zeroshot_retrieval":
        t2i = {f"R@{k.rsplit('@', 1)[1]}": v for k, v in m.items() if k.startswith("image_retrieval_recall@")}
        i2t = {f"R@{k.rsplit('@', 1)[1]}": v for k, v in m.items() if k.startswith("text_retrieval_recall@")}
        if not t2i or not i2t:
            return None
        mean = (sum(t2i.values()) + sum(i2t.values())) / (len(t2i) + len(i2t))
        # no tie rule: clip_benchmark's topk order equals dgmr's default where no scores tie, as with real embeddings
        return {**base, "metric": "retrieval", "image_to_text": i2t, "text_to_image": t2i, "mean_recall": mean}
    return None
