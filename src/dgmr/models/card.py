"""The model card (README.md) of a dgmr directory, in the Hugging Face conventions.

YAML front matter (``huggingface_hub.ModelCardData``): ``library_name``, ``tags`` (``dgmr``,
``pruned``, the library), ``base_model`` where the source names a Hub repository,
``license`` where the source's pretrained config gives one, ``pipeline_tag``, and the
evaluation results in the ``model-index`` format when there are some. The body says what
was cut and how, params and FLOPs before and after, and how to load the model with its
library and with dgmr; where the library's loader cannot rebuild the model, it says why.

The card is rendered from dgmr's record alone (dgmr.json), so ``dgmr card`` can render it
again with evaluation results.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..core.version import __version__

CARD = "README.md"
LIBRARY_NAMES = {"timm": "timm", "open_clip": "open_clip", "hf": "transformers"}


def card_name(record: dict[str, Any]) -> str:
    """The model's name on the card and in its model-index: the source's, marked as pruned."""
    src = record.get("source") or {}
    base = str(src.get("name") or record.get("class") or "model")
    for scheme in ("local-dir:", "hf-hub:"):
        base = base.removeprefix(scheme)
    base = base.rstrip("/").rsplit("/", 1)[-1] or "model"
    return f"{base}-dgmr-pruned"


def card_metadata(record: dict[str, Any], eval_results: Sequence[dict[str, Any]] = ()) -> Any:
    """The card's front matter as a ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import EvalResult, ModelCardData

    info = record.get("card") or {}
    library = info.get("library_name") or LIBRARY_NAMES.get(record.get("family"), "dgmr")
    tags = ["dgmr", "pruned", "vision"] + ([library] if library != "dgmr" else [])
    if record.get("distill"):
        tags.append("distilled")
    results = [EvalResult(**r) for r in eval_results]
    return ModelCardData(library_name=library, tags=tags, base_model=info.get("base_model") or None,
                         license=info.get("license") or None, pipeline_tag=info.get("pipeline_tag"),
                         model_name=card_name(record) if results else None, eval_results=results or None)


def _num(n: Any, unit: str = "") -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "unknown"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _change(before: Any, after: Any) -> str:
    if not all(isinstance(v, (int, float)) for v in (before, after)) or not before:
        return ""
    return f"{100 * (after / before - 1):+.1f}%"


def _span(ws: list[int]) -> str:
    return (str(ws[0]) if len(ws) == 1 else f"{ws[0]}..{ws[-1]} (per layer)") if ws else "?"


def _widths(record: dict[str, Any]) -> str:
    layers = (record.get("prune") or {}).get("layers") or []
    after = sorted(set(int(v) for v in (record.get("widths") or {}).values()))
    before = sorted({int(layer["hidden_before"]) for layer in layers if "hidden_before" in layer})
    n = len(record.get("widths") or {})
    return f"{n} MLPs, hidden width {_span(before)} -> {_span(after)}" if before else f"{n} MLPs, hidden width {_span(after)}"


def _heads(record: dict[str, Any]) -> str:
    """The attention heads: which layers lost heads, from how many to how many."""
    cut = [layer for layer in (record.get("prune") or {}).get("attention") or []
           if int(layer.get("heads_after", 0)) != int(layer.get("heads_before", 0))]
    n = len(record.get("heads") or {})
    if not cut:
        return f"all kept ({n} attention layers)" if n else "all kept"
    before = sorted({int(layer["heads_before"]) for layer in cut})
    after = sorted({int(layer["heads_after"]) for layer in cut})
    return f"{len(cut)} of {n or len(cut)} attention layers cut, heads {_span(before)} -> {_span(after)}"


def _what_was_done(record: dict[str, Any]) -> list[str]:
    prune = record.get("prune") or {}
    lines = [f"- **Source:** `{record.get('spec') or record.get('class')}`"
             + (" (random weights: an architecture test, not a trained model)" if record.get("random_init") else "")]
    if record.get("imported_from"):
        imp = record["imported_from"]
        lines.append(f"- **Imported:** a checkpoint pruned elsewhere ({imp.get('format', '?')}); the kept neurons "
                     "and criterion are unknown")
    elif prune:
        request = {k: v for k, v in prune.items() if k not in ("criterion", "seed", "layers", "calibration", "attention")}
        how = ", ".join(f"{k}={v}" for k, v in request.items())
        what = "MLP hidden neurons and attention heads" if prune.get("attention") else "MLP hidden neurons"
        lines.append(f"- **Pruned:** {what}, criterion `{prune.get('criterion')}` (seed {prune.get('seed')})"
                     + (f", {how}" if how else ""))
    lines.append(f"- **Widths:** {_widths(record)}")
    lines.append(f"- **Attention heads:** {_heads(record)}")
    cal = prune.get("calibration")
    if cal:
        lines.append(f"- **Calibration:** {cal.get('images', '?')} unlabeled images; down projections refit: "
                     f"{'yes' if cal.get('compensate') else 'no'}; widths allocated: {cal.get('allocate', 'uniform')}")
    else:
        lines.append("- **Calibration:** none (weights-only selection)")
    dist = record.get("distill")
    if dist:
        got = ", ".join(f"{k}={v}" for k, v in dist.items() if not isinstance(v, (dict, list)))
        lines.append(f"- **Distillation:** label-free feature distillation from the original ({got})")
    else:
        lines.append("- **Distillation:** none")
    return lines


def _sizes(record: dict[str, Any]) -> list[str]:
    pb, pa = record.get("params_before"), record.get("params_after", record.get("vision_params"))
    fb, fa = record.get("flops_before"), record.get("flops_after")
    size = record.get("image_size")
    return ["| vision tower | before | after | change |", "|---|---|---|---|",
            f"| parameters | {_num(pb)} | {_num(pa)} | {_change(pb, pa)} |",
            f"| FLOPs, one {size} px image | {_num(fb)} | {_num(fa)} | {_change(fb, fa)} |",
            "", "FLOPs are counted by `torch.utils.flop_counter` (one multiply-add = 2 FLOPs)."]


def _loading(record: dict[str, Any]) -> list[str]:
    note = record.get("native_export") or {}
    library = LIBRARY_NAMES.get(record.get("family"), "")
    out = ["`DIR` is this repository's folder; after an upload, timm and open_clip also read "
           "`hf-hub:USER/REPO` where `local-dir:DIR` stands, and transformers `USER/REPO`.", ""]
    if "skipped" in note:
        out += [f"**The {library} loader cannot load this model:** {note['skipped']}." if library else
                f"**No library loads this model directly:** {note['skipped']}.", ""]
    elif note.get("load"):
        lines = [f"import {'timm' if note.get('library_loader') else library}", note["load"]]
        if note.get("processor"):
            lines.append(note["processor"])
            lines.append("pipe = transformers.pipeline('image-feature-extraction', model='DIR')")
        if note.get("library_loader"):
            out += [f"**The {library} loader cannot load this model:** {note['library_loader']}. Its timm trunk "
                    "loads with timm:", "", "```python", *lines, "```", ""]
            out += [f"Then {note['then']}.", ""] if note.get("then") else []
        else:
            out += [f"With {library}:", "", "```python", *lines, "```", ""]
    out += ["With dgmr (`pip install dgmr`), offline, for any dgmr output:", "", "```python", "import dgmr", "",
            "model = dgmr.load('DIR')", "```"]
    return out


def _results_table(eval_results: Sequence[dict[str, Any]]) -> list[str]:
    rows = ["| task | dataset | metric | value |", "|---|---|---|---|"]
    for r in eval_results:
        value = r["metric_value"]
        rows.append(f"| {r.get('task_name') or r['task_type']} | {r['dataset_name']}"
                    f"{' (' + r['dataset_split'] + ')' if r.get('dataset_split') else ''} | "
                    f"{r.get('metric_name') or r['metric_type']} | {value:.4g} |" if isinstance(value, float)
                    else f"| {r.get('task_name') or r['task_type']} | {r['dataset_name']} | "
                         f"{r.get('metric_name') or r['metric_type']} | {value} |")
    return rows


def render_card(record: dict[str, Any], eval_results: Sequence[dict[str, Any]] = ()) -> str:
    """README.md of the dgmr directory whose record is ``record`` (dgmr.json), with
    ``eval_results`` (``huggingface_hub.EvalResult`` fields) in its model-index and a table."""
    meta = card_metadata(record, eval_results)
    body = [f"# {card_name(record)}", "",
            "A vision model whose MLPs were pruned with [dgmr](https://arxiv.org/abs/2506.08591) "
            "(Diversity-Guided MLP Reduction).", "", "## What was done", "", *_what_was_done(record), "",
            "## Size", "", *_sizes(record), "", "## How to load", "", *_loading(record), ""]
    if eval_results:
        body += ["## Evaluation", "", *_results_table(eval_results), ""]
    body += [f"Written by dgmr {record.get('dgmr_version', __version__)}; dgmr's own record is `dgmr.json`.", ""]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body)
