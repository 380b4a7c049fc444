"""The plots ``dgmr report`` and the demo draw (matplotlib, headless): recovery curves over
distillation steps, and accuracy against cost."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .demo import cut_kind, on_frontier


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run_recovery(plt: Any, run: dict[str, Any], path: Path) -> bool:
    """One distillation run's losses (training and held-out val_loss, log scale) and any logged
    accuracy against its step; False (nothing drawn) when its metrics hold neither."""
    ms = [m for m in run["metrics"] if isinstance(m.get("step"), (int, float))]
    loss_keys = [k for k in ("loss", "loss_pooled", "loss_tokens", "val_loss")
                 if any(isinstance(m.get(k), (int, float)) for m in ms)]
    acc_keys = sorted({k for m in ms for k, v in m.items() if isinstance(v, (int, float))
                       and ("top1" in k or "top5" in k or k.endswith("acc") or "accuracy" in k)})
    if not loss_keys and not acc_keys:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for k in loss_keys:
        pts = [(m["step"], m[k]) for m in ms if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if k == "val_loss" else "-", ms=3, label=k,
                lw=1.6 if k in ("loss", "val_loss") else 1.0)
    if loss_keys and all(m.get(k, 1) > 0 for m in ms for k in loss_keys if isinstance(m.get(k), (int, float))):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("distillation loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if acc_keys:
        ax2 = ax.twinx()
        for i, k in enumerate(acc_keys):
            pts = [(m["step"], m[k]) for m in ms if isinstance(m.get(k), (int, float))]
            scale = 100 if all(p[1] <= 1 for p in pts) else 1
            ax2.plot([p[0] for p in pts], [scale * p[1] for p in pts], "o--", ms=4, color=f"C{len(loss_keys) + i}", label=k)
        ax2.set_ylabel("accuracy (%)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(f"recovery: {run['name']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_accuracy_vs_flops(plt: Any, rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    """Every model of a report at its FLOPs, one colour per accuracy column, marked by role."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    markers = {"original": "o", "pruned": "s", "distilled": "^"}
    top = -math.inf
    for i, m in enumerate(metrics):
        pts = sorted(((r["flops"], 100 * r[m], r) for r in rows if r.get(m) is not None), key=lambda t: t[:2])
        if not pts:
            continue
        ax.plot([p[0] / 1e9 for p in pts], [p[1] for p in pts], "-", color=f"C{i}", alpha=0.4)
        names: dict[tuple[float, float], list[str]] = {}
        for f, a, r in pts:
            ax.scatter([f / 1e9], [a], marker=markers.get(r["role"], "D"), color=f"C{i}", s=40, zorder=3)
            names.setdefault((f, a), []).append(r["display"])
        for (f, a), who in names.items():  # one label per point, even where models coincide
            ax.annotate(", ".join(who), (f / 1e9, a), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.plot([], [], "-", color=f"C{i}", label=m)
        top = max(top, max(p[1] for p in pts))
    if top >= 95:
        ax.set_ylim(top=min(ax.get_ylim()[1], 101))
    ax.set_xlabel("GFLOPs per image (vision tower)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("accuracy vs FLOPs (○ original, □ pruned, △ distilled)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


METHOD_COLORS = {"diversity": "tab:blue", "l2": "tab:orange", "random": "tab:green", "diversity+comp": "tab:purple",
                 "diversity+comp+global": "tab:red"}
METHOD_MARKERS = {"diversity": "o", "l2": "s", "random": "^", "diversity+comp": "D", "diversity+comp+global": "P"}


def _method_color(method: str, i: int) -> str:
    return METHOD_COLORS.get(method, f"C{(i + 5) % 10}")


# a demo student's name: METHOD-CUT-sSEED, CUT r<ratio>[-h<heads>] or p<params fraction>
STUDENT_NAME = re.compile(r"^(?P<method>.+?)-(?P<cut>(?:r|p)[0-9.]+(?:-h\d+)?)-s\d+$")


def plot_student_recovery(curves: dict[str, list[dict[str, Any]]], path: Path, teacher_knn: float | None = None,
                          close: float = 0.005, knn_k: int = 20, rise: float = 1.1) -> None:
    """The demo's students during distillation, against the step (0: before any update): the
    held-out val_loss (log scale), the val_loss over its step-0 value (a line at ``rise``) and
    kNN top-1 (a band ``close`` under the teacher; a star: the exported weights). One colour
    per method, solid at r=1, dashed below, dotted for cuts with heads."""
    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    methods: list[str] = []
    for name, pts in curves.items():
        found = STUDENT_NAME.match(name)
        method, ratio = (found["method"], found["cut"]) if found else (name, "")
        if method not in methods:
            methods.append(method)
        style = "-" if ratio == "r1" else ":" if "-h" in ratio or ratio.startswith("p") else "--"
        color = _method_color(method, methods.index(method))
        label = f"{method} {ratio}"
        val = [(p["step"], p["val_loss"]) for p in pts if "val_loss" in p]
        if val:
            ax1.plot(*zip(*val), style, color=color, alpha=0.7, label=label)
            ax2.plot([v[0] for v in val], [v[1] / val[0][1] for v in val], style, color=color, alpha=0.7, label=label)
        acc = [(p["step"], 100 * p["knn_top1"]) for p in pts if "knn_top1" in p and not p.get("exported")]
        ax3.plot(*zip(*acc), style, marker="o", ms=3, color=color, alpha=0.6, label=label)
        for p in pts:
            if p.get("exported"):
                ax3.plot([p["step"]], [100 * p["knn_top1"]], marker="*", ms=9, color=color, alpha=0.9, ls="none")
    ax1.set(xlabel="distillation step", ylabel="held-out val_loss (MSE)", yscale="log", title="val_loss")
    ax2.axhline(rise, color="black", lw=0.8, ls=":", label=f"{rise:g} x step 0")
    ax2.set(xlabel="distillation step", ylabel="val_loss / step-0 val_loss", yscale="log",
            title="val_loss against its start")
    if teacher_knn is not None:
        ax3.axhspan(100 * (teacher_knn - close), 100 * teacher_knn, color="gray", alpha=0.2,
                    label=f"teacher kNN (-{100 * close:g} pt)")
    ax3.plot([], [], marker="*", ms=9, color="gray", ls="none", label="exported (best val_loss)")
    ax3.set(xlabel="distillation step (0: pruned, before distillation)", ylabel=f"test kNN top-1 (%), k={knn_k}",
            title="recovery")
    for ax in (ax1, ax2, ax3):
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_demo_accuracy_vs_flops(results: dict[str, Any], path: Path) -> None:
    """The demo's teacher and students at their FLOPs: each method in its colour and marker,
    hollow before distillation and filled after (mean, bars: min..max over seeds), joined by a
    line; methods of equal FLOPs are set side by side, the legend outside the axes."""
    plt = pyplot()
    t = results["teacher"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.scatter([t["flops"] / 1e6], [100 * t["knn_top1"]], marker="*", s=220, color="black", label="teacher", zorder=3)
    rows = results["summary"]
    span = max([a["flops"] for a in rows] + [t["flops"]]) / 1e6 - min(a["flops"] for a in rows) / 1e6 if rows else 1
    methods = list(dict.fromkeys(a.get("method", a["criterion"]) for a in rows))
    for a in rows:
        method = a.get("method", a["criterion"])
        i = methods.index(method)
        color, marker = _method_color(method, i), METHOD_MARKERS.get(method, "x")
        x = a["flops"] / 1e6 + (i - (len(methods) - 1) / 2) * 0.035 * span  # side by side at equal FLOPs
        before, after = 100 * a["knn_top1_before"], 100 * a["knn_top1_after"]
        ax.plot([x, x], [before, after], "-", color=color, lw=0.8, alpha=0.5)
        ax.scatter([x], [before], marker=marker, s=36, facecolors="none", edgecolors=color, zorder=3)
        spread = [[max(0.0, after - 100 * a["knn_top1_after_min"])], [max(0.0, 100 * a["knn_top1_after_max"] - after)]]
        ax.errorbar([x], [after], yerr=spread, fmt=marker, ms=6, color=color, capsize=2,
                    label=method, zorder=4)
    groups: dict[float, list[dict[str, Any]]] = {}
    for a in rows:
        groups.setdefault(a["flops"] / 1e6, []).append(a)
    for x, group in groups.items():  # one label per group of students of equal cost, above it
        top = max(100 * a["knn_top1_after_max"] for a in group)
        ratios = sorted({a.get("cut") or f"r={a['mlp_ratio']:g}" for a in group})
        ax.annotate(", ".join(ratios), (x, top), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="hollow: before distillation")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.set(xlabel="MFLOPs per image", ylabel=f"kNN top-1 (%), k={results['knn_k']}",
           title="accuracy vs FLOPs (hollow: pruned; filled: distilled, exported)")
    ax.grid(alpha=0.3)
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(results: dict[str, Any], path: Path) -> None:
    """Accuracy against parameters: kNN of the calibrated cuts before distillation, "MLP only"
    against "MLP + heads" (results["frontier"]), each a line by size; the students after
    distillation as filled markers beside them; the teacher a star."""
    plt = pyplot()
    t = results["teacher"]
    fig, ax = plt.subplots(figsize=(8, 4.6))
    ax.scatter([100.0], [100 * t["knn_top1"]], marker="*", s=220, color="black", label="teacher", zorder=3)
    styles = {"MLP only": ("tab:blue", "o"), "MLP + heads": ("tab:red", "s")}
    for kind, (color, marker) in styles.items():
        pts = sorted((r for r in results.get("frontier", []) if r["kind"] == kind), key=lambda r: r["params"])
        if not pts:
            continue
        xs, ys = [100 * r["params_fraction"] for r in pts], [100 * r["knn_top1"] for r in pts]
        ax.plot(xs, ys, "-", marker=marker, mfc="none", color=color, label=f"{kind}: before distillation")
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(r["cut"], (x, y), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    for a in filter(on_frontier, results["summary"]):
        kind = cut_kind(a)
        color, marker = styles[kind]
        ax.scatter([100 * a["params"] / t["params"]], [100 * a["knn_top1_after"]], marker=marker, s=40, color=color,
                   label=f"{kind}: after distillation", zorder=4)
    ax.set(xlabel="vision tower parameters kept (% of the teacher)", ylabel="test kNN top-1 (%)",
           title="accuracy against parameters (calibrated cuts)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
