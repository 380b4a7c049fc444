"""The demo's report: its results table (terminal and Markdown) and report.md."""
from __future__ import annotations

from typing import Any

from .tables import markdown_table, pct, text_table


def _spread(row: dict[str, Any], key: str) -> str:
    if row["seeds"] == 1:
        return pct(row[key])
    return f"{pct(row[key])} ± {100 * row[key + '_std']:.1f}"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    t = results["teacher"]
    rows = [["teacher", f"{t['params'] / 1e6:.3f}M", f"{t['flops'] / 1e6:.1f}M", f"{t['images_per_s']:.0f}",
             "-", "-", pct(t["knn_top1"]), pct(t["head_top1"]), "-", "-"]]
    for a in results["summary"]:
        close = ", ".join("-" if v is None else str(v) for v in a.get("knn_close_steps", []))
        rows.append([f"{a.get('method', a['criterion'])} r={a['mlp_ratio']:g} (n={a['seeds']})",
                     f"{a['params'] / 1e6:.3f}M", f"{a['flops'] / 1e6:.1f}M", f"{a['images_per_s']:.0f}",
                     _spread(a, "knn_top1_before"), _spread(a, "head_top1_before"),
                     _spread(a, "knn_top1_after"), _spread(a, "head_top1_after"),
                     f"{100 * a['knn_delta_vs_teacher']:+.1f}", close or "-"])
    return rows


HEADER = ["model", "params", "FLOPs", "img/s", "kNN before", "head before", "kNN after", "head after",
          "ΔkNN vs teacher", "kNN ≈ teacher at step"]


def render_markdown(results: dict[str, Any]) -> str:
    t = results["teacher"]
    lines = [
        "# dgmr demo: DGMR on handwritten digits", "",
        f"Data: {results['data']['name']}, {results['data']['train']} train / {results['data']['test']} test images, "
        f"{results['data']['image_size']}x{results['data']['image_size']}. Teacher: timm VisionTransformer (width 96, depth 6, mlp ratio 4) trained from "
        f"scratch for {t['train']['epochs']} epochs. Students: pruned with each criterion, then distilled for "
        f"{results['settings']['distill_steps']} steps on the unlabeled train images. Accuracies are test top-1 in %: "
        f"kNN (k={results['knn_k']}, cosine, pooled features) and the classifier head; 'before' = pruned, not distilled. "
        "Mean ± standard deviation over seeds where n > 1. CPU throughput measured in one run, one thread.", "",
        *markdown_table(HEADER, table_rows(results)), "",
        "MLP parameter reduction: " + ", ".join(sorted({f"r={a['mlp_ratio']:g}: {100 * a['mlp_param_reduction']:.0f}%"
                                                         for a in results["summary"]})) + ".", "",
        "![recovery](recovery.png)", "", "![accuracy vs FLOPs](accuracy_vs_flops.png)", "",
        f"Wall time: {results['wall_seconds']:.0f} s.", "",
    ]
    return "\n".join(lines)


def print_table(results: dict[str, Any]) -> None:
    print(text_table(HEADER, table_rows(results)))
