"""``dgmr report``: one table comparing original / pruned / distilled models, and plots.

Inputs are result JSON files written by ``dgmr eval ... --save FILE`` (or the dicts
themselves), dgmr model directories, and distillation run directories (a ``metrics.jsonl``
plus the exported student and any saved results). Output: ``report.md`` (a Markdown table
with deltas against the original), ``report.json``, ``recovery_<run>.png`` (distillation
loss and any logged accuracy vs step) and ``accuracy_vs_flops.png``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import DgmrError
from ..evaluate.results import dataset_name, from_clip_benchmark, is_clip_benchmark
from ..evaluate.tasks import model_role
from ..io.output import atomic_dir, output_lock, refuse_overlap, write_json
from ..models.artifact import read_config
from ..models.sources import is_dgmr_dir
from .plots import plot_accuracy_vs_flops, plot_run_recovery, pyplot
from .tables import fmt_count, markdown_table

ROLE_ORDER = {"original": 0, "pruned": 1, "distilled": 2}


def _norm(label: str) -> str:
    return os.path.normpath(label) if os.path.exists(label) else label


def _recall_columns(result: dict[str, Any], suffix: str) -> dict[str, float]:
    """R@1 of both directions (or the smallest K there is: clip_benchmark's default is K=5)."""
    i2t, t2i = result["image_to_text"], result["text_to_image"]
    common = sorted((k for k in i2t if k in t2i), key=lambda k: int(k.removeprefix("R@")))
    if not common:
        return {}
    k = "R@1" if "R@1" in common else common[0]
    return {f"i→t {k}{suffix}": i2t[k], f"t→i {k}{suffix}": t2i[k]}


def metric_columns(result: dict[str, Any]) -> dict[str, float]:
    """The accuracy-like numbers of one eval result, as {column: fraction}."""
    m = result.get("metric")
    if m in ("knn", "linear", "zeroshot"):
        ds = result.get("dataset") or dataset_name(result.get("val") or result.get("data"))
        suffix = f" ({ds})" if ds else ""
        if m == "linear" and result.get("protocol") not in (None, "lbfgs"):
            m = f"linear [{result['protocol']}]"  # another recipe, another number: its own column
        cols = {f"{m} top-1{suffix}": result["top1"]}
        if result.get("mean_per_class_recall") is not None:
            cols[f"{m} mean per-class recall{suffix}"] = result["mean_per_class_recall"]
        return cols
    if m == "retrieval":
        ds = result.get("dataset") or dataset_name(result.get("captions"))
        suffix = (f" ({ds})" if ds else "") + (f" [ties {result['ties']}]"
                                              if result.get("ties") not in (None, "expected") else "")
        ks = sorted({k.removeprefix("R@") for k in result["image_to_text"]}, key=int)
        mean_col = f"retrieval mean recall{suffix}" if ks == ["1", "5", "10"] else \
            f"retrieval mean recall@{','.join(ks)}{suffix}"  # a mean over other Ks is another number
        return {mean_col: result["mean_recall"], **_recall_columns(result, suffix)}
    return {}


class _Rows:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.metrics: list[str] = []
        self.sources: dict[str, list[str]] = {}
        self.skipped: list[str] = []

    def row(self, label: str) -> dict[str, Any]:
        label = _norm(label)
        return self.rows.setdefault(label, {"model": label, "role": None})

    def add_result(self, res: dict[str, Any], origin: str) -> None:
        if res.get("metric") == "speed":
            for name, r in res["models"].items():
                row = self.row(name)
                for k in ("params", "flops", "throughput", "latency_ms"):
                    if r.get(k) is not None:
                        row[k] = r[k]
                if str(res.get("peak_memory_kind", "")).startswith("cuda") and r.get("peak_memory_bytes"):
                    row["peak_memory_bytes"] = r["peak_memory_bytes"]  # CPU RSS is the whole process: not shown
                row["speed_setting"] = f"{res.get('device')}, {res.get('dtype')}, batch {res.get('batch_size')}, {res.get('image_size')} px"
                if r.get("role"):
                    row["role"] = row["role"] or r["role"]
            return
        if is_clip_benchmark(res):
            converted = from_clip_benchmark(res, origin)
            if converted is None:  # a task without accuracies to table (captioning, multi-label mAP)
                self.skipped.append(f"{origin} ({res.get('task')})")
                return
            res = converted
        if "model" not in res or "metric" not in res:
            raise DgmrError(f"{origin}: not a dgmr eval result (no 'metric'/'model' fields) nor a clip_benchmark "
                            "result (no 'task'/'metrics' fields)")
        row = self.row(res["model"])
        row["role"] = row["role"] or res.get("role")
        for k in ("params", "flops"):
            if res.get(k) is not None and k not in row:
                row[k] = res[k]
        for col, v in metric_columns(res).items():
            row[col] = v
            if col not in self.metrics:
                self.metrics.append(col)
        self.sources.setdefault(row["model"], []).append(origin)

    def add_model_dir(self, path: Path, role: str | None = None) -> dict[str, Any]:
        cfg = read_config(path)
        row = self.row(str(path))
        row["role"] = role or row["role"] or model_role(path)
        if cfg.get("vision_params") and "params" not in row:
            row["params"] = cfg["vision_params"]
        return row


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``, checked as ``--resume`` checks them (a torn last line
    of a live run is skipped): :func:`dgmr.distill.rundir.read_metrics`."""
    from ..distill.rundir import read_metrics as read_lines

    return [row for _, row in read_lines(path)]


def load_json_results(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DgmrError(f"cannot read result file {path}: {e}") from None
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(d, dict) for d in items):
        raise DgmrError(f"{path}: expected a result object or a list of them")
    return items


def is_result(d: dict[str, Any]) -> bool:
    return d.get("metric") in ("knn", "linear", "zeroshot", "retrieval", "speed") or is_clip_benchmark(d)


def collect(inputs: Sequence[str | os.PathLike | dict[str, Any]]) -> tuple[_Rows, list[dict[str, Any]]]:
    """Read every input into table rows; returns (rows, runs) where a run is
    {"name", "path", "metrics": [...]} for each distillation run directory."""
    rows, runs = _Rows(), []
    for item in inputs:
        if isinstance(item, dict):
            rows.add_result(item, "<dict>")
            continue
        p = Path(item)
        if p.is_file():
            for d in load_json_results(p):
                rows.add_result(d, str(p))
            continue
        if not p.is_dir():
            raise DgmrError(f"{p} does not exist")
        found = False
        metrics = p / "metrics.jsonl"
        if metrics.is_file():
            run = {"name": p.name or str(p), "path": str(p), "metrics": read_metrics(metrics)}
            runs.append(run)
            found = True
        model_dirs = [p] if is_dgmr_dir(p) else []
        model_dirs += [d for d in sorted(p.iterdir()) if d.is_dir() and is_dgmr_dir(d)]
        for d in model_dirs:
            row = rows.add_model_dir(d, "distilled" if metrics.is_file() else None)
            if metrics.is_file():
                runs[-1]["model"] = row["model"]
            found = True
        for f in sorted(p.glob("*.json")) + sorted(p.glob("eval/*.json")):
            if f.name in ("config.json", "dgmr.json", "open_clip_config.json", "preprocessor_config.json"):
                continue  # a model directory's configs, not results
            try:
                items = load_json_results(f)
            except DgmrError:
                continue
            for d in items:
                if is_result(d):
                    rows.add_result(d, str(f))
                    found = True
        if not found:
            raise DgmrError(f"{p} holds no metrics.jsonl, dgmr model or eval result JSON")
    if not rows.rows and not runs:
        raise DgmrError("nothing to report")
    return rows, runs


def _rel(v: float | None, base: float | None) -> str:
    if v is None or base is None or not base:
        return ""
    d = v / base - 1
    return "" if abs(d) < 5e-4 else f" ({d:+.1%})"


def _ordered_rows(rows_obj: "_Rows", baseline: str | None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Rows by role (original, pruned, distilled; input order within a role) and the baseline row."""
    rows = list(rows_obj.rows.values())
    for r in rows:
        r["role"] = r["role"] or "original"
    rows.sort(key=lambda r: ROLE_ORDER.get(r["role"], 3))
    if baseline is not None:
        base = next((r for r in rows if r["model"] in (baseline, _norm(baseline))), None)
        if base is None:
            raise DgmrError(f"--baseline {baseline!r} is none of the models: {', '.join(r['model'] for r in rows)}")
    else:
        base = next((r for r in rows if r["role"] == "original"), rows[0] if rows else None)
    _set_display_names(rows)
    return rows, base


COST_COLUMNS = (("params", "params"), ("flops", "FLOPs/img"), ("throughput", "img/s"), ("peak_memory_bytes", "peak mem"))


def _cost_cell(key: str, v: float, b: float | None, is_base: bool, jr: dict[str, Any]) -> str:
    """One params/FLOPs/throughput/memory cell, relative to the baseline's value ``b``."""
    if key == "throughput":
        jr["speedup"] = None if not b else v / b
        return f"{v:.1f}" + ("" if is_base or not b else f" (×{v / b:.2f})")
    if key == "peak_memory_bytes":
        return fmt_count(v, "B") + ("" if is_base else _rel(v, b))
    jr[f"{key}_ratio"] = None if not b or not v else b / v
    return fmt_count(v) + ("" if is_base else _rel(v, b))


def _table_row(r: dict[str, Any], base: dict[str, Any] | None, costs: list[str],
               metrics: list[str]) -> tuple[str, dict[str, Any]]:
    """(Markdown row, report.json row) of one model: costs relative, accuracies in points."""
    is_base = r is base
    cells = [f"`{r['display']}`", r["role"]]
    jr = {"model": r["model"], "display": r["display"], "role": r["role"]}
    for key in costs:
        v = jr[key] = r.get(key)
        cells.append("–" if v is None else _cost_cell(key, v, (base or {}).get(key), is_base, jr))
    for m in metrics:
        v = jr[m] = r.get(m)
        if v is None:
            cells.append("–")
            continue
        b = (base or {}).get(m)
        jr[f"{m} delta"] = None if b is None else v - b
        cells.append(f"{100 * v:.1f}" + ("" if is_base or b is None else f" ({100 * (v - b):+.1f})"))
    return "| " + " | ".join(cells) + " |", jr


def _table(rows: list[dict[str, Any]], base: dict[str, Any] | None, metrics: list[str]
           ) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(header, Markdown table lines, report.json rows); cost columns only where some row has them."""
    costs = [key for key, _ in COST_COLUMNS if any(r.get(key) is not None for r in rows)]
    header = ["model", "role"] + [col for key, col in COST_COLUMNS if key in costs] + metrics
    table = markdown_table(header, [], numeric_from=2)
    json_rows = []
    for r in rows:
        line, jr = _table_row(r, base, costs, metrics)
        table.append(line)
        json_rows.append(jr)
    return header, table, json_rows


def _plot_sections(plt: Any, tmp: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]],
                   metrics: list[str]) -> tuple[list[str], list[str]]:
    """Draw the recovery curves and the accuracy-vs-FLOPs plot into ``tmp``; (file names, Markdown lines)."""
    plots: list[str] = []
    lines: list[str] = []
    for run in runs:
        name = f"recovery_{_slug(run['name'])}.png"
        if not plot_run_recovery(plt, run, tmp / name):
            continue
        plots.append(name)
        lines += ["", f"## Recovery: {run['name']}", "", f"![recovery curve]({name})"]
        last = run["metrics"][-1] if run["metrics"] else {}
        if "loss" in last:
            first_loss = next((m["loss"] for m in run["metrics"] if "loss" in m), None)
            lines += ["", f"Distillation loss {first_loss:.4g} → {last['loss']:.4g} over {last.get('step')} steps."]
        vals = [m for m in run["metrics"] if isinstance(m.get("val_loss"), (int, float))]
        if vals:
            best = min(vals, key=lambda m: m["val_loss"])
            lines += ["", f"Held-out val_loss {vals[0]['val_loss']:.4g} at step {vals[0]['step']}, lowest "
                          f"{best['val_loss']:.4g} at step {best['step']}, last {vals[-1]['val_loss']:.4g}."]
    pts = [r for r in rows if r.get("flops") and any(r.get(m) is not None for m in metrics)]
    if pts and metrics:
        name = "accuracy_vs_flops.png"
        plot_accuracy_vs_flops(plt, pts, metrics, tmp / name)
        plots.append(name)
        lines += ["", "## Accuracy vs FLOPs", "", f"![accuracy vs FLOPs]({name})"]
    return plots, lines


def render_report(results: Sequence[str | os.PathLike | dict[str, Any]], out_dir: str | os.PathLike, *,
                  baseline: str | None = None, overwrite: bool = False, title: str = "dgmr report") -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and PNG plots into ``out_dir`` (atomically) from
    result files / dicts, dgmr model dirs and distillation run dirs; returns a summary."""
    refuse_overlap(out_dir, [("input", r) for r in results if isinstance(r, (str, os.PathLike))], "report directory")
    with output_lock(out_dir):  # held while the inputs are read, not only while writing
        return _render_report(results, out_dir, baseline, overwrite, title)


def _render_report(results: Sequence[str | os.PathLike | dict[str, Any]], out_dir: str | os.PathLike,
                   baseline: str | None, overwrite: bool, title: str) -> dict[str, Any]:
    plt = pyplot()
    rows_obj, runs = collect(results)
    rows, base = _ordered_rows(rows_obj, baseline)
    metrics = rows_obj.metrics
    header, table, json_rows = _table(rows, base, metrics)
    lines = [f"# {title}", ""]
    if base is not None:
        lines += [f"Deltas are against **{base['display']}** ({base['role']}, `{base['model']}`): relative for params, FLOPs and "
                  "throughput, percentage points for accuracies. Accuracies in %.", ""]
    lines += table
    if rows_obj.skipped:
        lines += ["", "Not tabled (no accuracy or recall to compare): " + "; ".join(rows_obj.skipped) + "."]
    settings = sorted({r["speed_setting"] for r in rows if r.get("speed_setting")})
    if settings:
        lines += ["", "Throughput measured on: " + "; ".join(settings) + " (median over repeats, warm-up excluded)."]
    with atomic_dir(out_dir, overwrite) as tmp:
        plots, plot_lines = _plot_sections(plt, tmp, runs, rows, metrics)
        (tmp / "report.md").write_text("\n".join(lines + plot_lines) + "\n", encoding="utf-8")
        summary = {"title": title, "baseline": base["model"] if base else None, "columns": header, "rows": json_rows,
                   "runs": [{"name": r["name"], "path": r["path"], "model": r.get("model"), "steps": len(r["metrics"]),
                             "last": r["metrics"][-1] if r["metrics"] else None} for r in runs],
                   "plots": plots, "sources": rows_obj.sources}
        write_json(tmp / "report.json", summary)
    return {"out": str(out_dir), "markdown": str(Path(out_dir) / "report.md"), "json": str(Path(out_dir) / "report.json"),
            "plots": [str(Path(out_dir) / p) for p in plots], "models": len(rows), "runs": len(runs),
            "table": "\n".join(table)}


def _set_display_names(rows: list[dict[str, Any]]) -> None:
    """Short names for the table and plots: a path's last component where that is unique."""
    short = [Path(r["model"]).name if os.path.sep in r["model"] else r["model"] for r in rows]
    unique = len(set(short)) == len(short) and all(short)
    for r, s in zip(rows, short):
        r["display"] = s if unique else r["model"]


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s) or "run"


