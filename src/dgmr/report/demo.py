"""The demo's report: its results table (terminal and Markdown), its checks and report.md."""
from __future__ import annotations

from typing import Any

from .tables import markdown_table, pct, text_table


def _spread(row: dict[str, Any], key: str) -> str:
    if row["seeds"] == 1:
        return pct(row[key])
    return f"{pct(row[key])} ± {100 * row[key + '_std']:.1f}"


def _images(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


def close_cell(row: dict[str, Any]) -> str:
    """Per seed, the first kNN-evaluated step within 0.5 point of the teacher and the training
    images seen by then ("-": not within the run)."""
    steps, images = row.get("knn_close_steps", []), row.get("knn_close_images", [])
    cells = ["-" if st is None else f"{st} ({_images(im)})" for st, im in zip(steps, images)]
    return ", ".join(cells) or "-"


def steps_cell(row: dict[str, Any]) -> str:
    """Per seed, the steps trained (``*``: stopped early) and the step exported (the best val_loss)."""
    out = []
    for n, best, why in zip(row.get("steps_run", []), row.get("best_steps", []), row.get("stopped", [])):
        out.append(f"{n}{'*' if why else ''}/{best}")
    return ", ".join(out) or "-"


def cut_of(row: dict[str, Any]) -> str:
    """What a student's cut was: "r=0.5", "r=0.5, 2 heads", "32% params" (older results: r only)."""
    return row.get("cut") or f"r={row['mlp_ratio']:g}"


def cut_kind(row: dict[str, Any]) -> str:
    """"MLP only", or "MLP + heads" for a cut that removed heads or spent one params_fraction budget."""
    if row.get("heads_kept_fraction", 1.0) == 1 and row.get("params_fraction") is None:
        return "MLP only"
    return "MLP + heads"


def on_frontier(row: dict[str, Any]) -> bool:
    """Whether a student (a summary row) is a point of the accuracy-against-parameters frontier:
    calibrated, with uniform widths or cut with heads (not the MLP-only global allocation)."""
    cal = row.get("calibration")
    return cal is not None and (cal["allocate"] == "uniform" or cut_kind(row) == "MLP + heads")


def frontier_lines(results: dict[str, Any]) -> list[str]:
    """The accuracy-against-parameters table (before distillation, every cut calibrated)."""
    rows = results.get("frontier") or []
    if not rows:
        return []
    body = [[r["kind"], r["cut"], f"{100 * r['params_fraction']:.1f}%", f"{100 * r['heads_kept_fraction']:.0f}%",
             pct(r["knn_top1"]), pct(r["head_top1"])] for r in rows]
    return ["Accuracy against parameters, calibrated cuts before any distillation (MLP only: its floor is r=0.125; "
            "MLP + heads: heads cut too, uniformly or by one params_fraction budget):", "",
            *markdown_table(["cut kind", "cut", "params", "heads kept", "kNN before", "head before"], body), "",
            "![accuracy vs params](accuracy_vs_params.png)", ""]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    t = results["teacher"]
    rows = [["teacher", f"{t['params'] / 1e6:.3f}M", f"{t['flops'] / 1e6:.1f}M", f"{t['images_per_s']:.0f}",
             "-", "-", pct(t["knn_top1"]), pct(t["head_top1"]), "-", "-", "-", "-"]]
    for a in results["summary"]:
        ratio = a.get("val_loss_max_ratio")
        rows.append([f"{a.get('method', a['criterion'])} {cut_of(a)} (n={a['seeds']})",
                     f"{a['params'] / 1e6:.3f}M", f"{a['flops'] / 1e6:.1f}M", f"{a['images_per_s']:.0f}",
                     _spread(a, "knn_top1_before"), _spread(a, "head_top1_before"),
                     _spread(a, "knn_top1_after"), _spread(a, "head_top1_after"),
                     f"{100 * a['knn_delta_vs_teacher']:+.1f}", close_cell(a), steps_cell(a),
                     "-" if ratio is None else f"{ratio:.2f}"])
    return rows


HEADER = ["model", "params", "FLOPs", "img/s", "kNN before", "head before", "kNN after", "head after",
          "ΔkNN vs teacher", "kNN ≈ teacher at step (images)", "steps / best", "val_loss max ÷ step 0"]


def check_lines(results: dict[str, Any]) -> list[str]:
    return [f"- {'yes' if c['ok'] else '**no**'}: {c['check']} ({c['figure']})" for c in results.get("checks", [])]


def render_markdown(results: dict[str, Any]) -> str:
    t, st = results["teacher"], results["settings"]
    lr = (f"peak lr {st['distill_lr']:g}" if st.get("distill_lr") else
          f"peak lr from the `{st.get('lr_rule', 'fit')}` rule (paper's base lr {st.get('distill_base_lr', 0):g} x 64 / "
          "256 = 1e-3, scaled down for students whose step-0 val_loss is already small)")
    stop = (f"early stopping after {st['early_stop']} evaluations without a {100 * st['min_delta']:g}% gain"
            if st.get("early_stop") else "no early stopping")
    lines = [
        "# dgmr demo: DGMR on handwritten digits", "",
        f"Data: {results['data']['name']}, {results['data']['train']} train / {results['data']['test']} test images, "
        f"{results['data']['image_size']}x{results['data']['image_size']}. Teacher: timm VisionTransformer (width 96, "
        f"depth 6, mlp ratio 4) trained from scratch for {t['train']['epochs']} epochs. Students: pruned with each "
        f"criterion, then distilled for at most {st['distill_steps']} steps of {st['distill_batch']} unlabeled train "
        f"images ({lr}; val_loss on a held-out 2% of the train images every {st.get('eval_every', '-')} steps from "
        f"step 0; {stop}; the weights with the lowest val_loss exported). Accuracies are test top-1 in %: kNN "
        f"(k={results['knn_k']}, cosine, pooled features) and the classifier head; 'before' = pruned, not distilled; "
        "'after' = the exported weights. Mean ± standard deviation over seeds where n > 1. CPU throughput measured in "
        "one run, one thread.", "",
        f"Per seed: 'kNN ≈ teacher at step (images)' is the first step, kNN scored every {st.get('knn_every', '-')} "
        "steps, at which kNN is within 0.5 point of the teacher's, with the training images seen by then ('-': not "
        "within the run); 'steps / best' the steps trained (* stopped early) and the step exported; "
        "'val_loss max ÷ step 0' the highest val_loss over the run against the step-0 value (worst seed).", "",
        *markdown_table(HEADER, table_rows(results)), "",
        "MLP parameter reduction: " + ", ".join(sorted({f"{cut_of(a)}: {100 * a['mlp_param_reduction']:.0f}%"
                                                         for a in results["summary"]})) + ".", "",
        *frontier_lines(results),
        "Checks:", "", *check_lines(results), "",
        "![recovery](recovery.png)", "", "![accuracy vs FLOPs](accuracy_vs_flops.png)", "",
        f"Wall time: {results['wall_seconds']:.0f} s.", "",
    ]
    return "\n".join(lines)


def print_table(results: dict[str, Any]) -> None:
    print(text_table(HEADER, table_rows(results)))
    for line in check_lines(results):
        print(line.replace("**", ""))
