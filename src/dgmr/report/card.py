"""``dgmr card DIR --results res/*.json``: the model card of a dgmr directory, rendered again
with evaluation results in its model-index (the Hugging Face format the Hub shows as an
evaluation table). Every input is checked before the card is touched: a directory that is
not a dgmr output, a results file that does not parse, or a result of another model is one
:class:`DgmrError` and the card stays as it was."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import DgmrError
from ..evaluate.results import from_clip_benchmark, is_clip_benchmark
from ..io.output import atomic_path, output_lock
from ..models.artifact import read_config
from ..models.card import CARD, card_name, render_card
from .compare import is_result, load_json_results, metric_columns

TASKS = {"knn": ("image-classification", "kNN classification"),
         "linear": ("image-classification", "linear probe"),
         "zeroshot": ("zero-shot-image-classification", "zero-shot classification"),
         "retrieval": ("zero-shot-image-retrieval", "image-text retrieval")}


def _same_model(result: dict[str, Any], directory: Path, record: dict[str, Any]) -> bool:
    """A result belongs to ``directory`` when it names it (a path resolving to it), or names it
    by its folder or card name with the same parameter count where the result has one."""
    name = str(result.get("model") or "")
    if name and os.path.realpath(name) == os.path.realpath(directory):
        return True
    if name.rstrip("/").rsplit("/", 1)[-1] not in (directory.resolve().name, card_name(record)):
        return False
    params = result.get("params")
    return params is None or params == record.get("vision_params")


def _eval_results(result: dict[str, Any]) -> list[dict[str, Any]]:
    """``huggingface_hub.EvalResult`` fields of one dgmr eval result."""
    task_type, task_name = TASKS.get(result.get("metric"), ("image-classification", str(result.get("metric"))))
    dataset = str(result.get("dataset") or "unknown")
    out = []
    for col, value in metric_columns(result).items():
        metric = col.split(" (")[0]
        out.append({"task_type": task_type, "task_name": task_name, "dataset_type": dataset, "dataset_name": dataset,
                    "metric_type": "recall" if "recall" in metric else "accuracy", "metric_name": metric,
                    "metric_value": round(float(value), 6)})
    return out


def card_results(directory: str | os.PathLike, results: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """The evaluation results in ``results`` (dgmr ``eval --save`` files or clip_benchmark
    results) as model-index entries, all checked to be results of ``directory``'s model."""
    directory = Path(directory)
    record = read_config(directory)
    entries: list[dict[str, Any]] = []
    for f in results:
        for d in load_json_results(Path(f)):
            if not is_result(d):
                raise DgmrError(f"{f}: not an evaluation result (no 'metric'/'model' fields, nor clip_benchmark's "
                                "'task'/'metrics')")
            res = from_clip_benchmark(d, str(f)) if is_clip_benchmark(d) else d
            if res is None or res.get("metric") == "speed":
                continue  # not a metric the model-index holds (captioning, throughput)
            if not _same_model(res, directory, record):
                raise DgmrError(f"{f} holds results of {res.get('model')!r}, not of {directory} (evaluate this "
                                "directory, e.g. dgmr eval knn DIR ... --save FILE)")
            entries += _eval_results(res)
    if results and not entries:
        raise DgmrError("the results files hold no accuracy or recall to put in the card")
    return entries


def write_card(directory: str | os.PathLike, results: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Render ``directory``'s README.md again from its record, with ``results``; returns a summary."""
    directory = Path(directory)
    entries = card_results(directory, results)  # everything checked before the card is touched
    record = read_config(directory)
    text = render_card(record, entries)
    with output_lock(directory), atomic_path(directory / CARD, "the model card") as tmp:
        tmp.write_text(text)
    return {"card": str(directory / CARD), "model": card_name(record), "results": len(entries),
            "library_name": (record.get("card") or {}).get("library_name")}
