"""The plots ``dgmr report`` and the demo draw (matplotlib, headless): recovery curves over
distillation steps, and accuracy against cost."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run_recovery(plt: Any, run: dict[str, Any], path: Path) -> bool:
    """One distillation run's losses (log scale) and any logged accuracy against its step;
    False (nothing drawn) when its metrics hold neither."""
    ms = [m for m in run["metrics"] if isinstance(m.get("step"), (int, float))]
    loss_keys = [k for k in ("loss", "loss_pooled", "loss_tokens") if any(isinstance(m.get(k), (int, float)) for m in ms)]
    acc_keys = sorted({k for m in ms for k, v in m.items() if isinstance(v, (int, float))
                       and ("top1" in k or "top5" in k or k.endswith("acc") or "accuracy" in k)})
    if not loss_keys and not acc_keys:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for k in loss_keys:
        pts = [(m["step"], m[k]) for m in ms if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1.6 if k == "loss" else 1.0)
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


def plot_student_recovery(curves: dict[str, list[dict[str, Any]]], path: Path, teacher_knn: float | None = None,
                          close: float = 0.005, knn_k: int = 20) -> None:
    """The demo's students during distillation: loss (left) and kNN top-1 (right) against the
    step, one colour per method, solid at r=1 and dashed below; a band ``close`` under the teacher."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"diversity": "tab:blue", "l2": "tab:orange", "random": "tab:green", "diversity+comp": "tab:purple",
              "diversity+comp+global": "tab:red"}
    for name, pts in curves.items():
        crit, ratio = name.split("-")[0], name.split("-")[1]
        style = "-" if ratio == "r1" else "--"
        loss = [(p["step"], p["loss"]) for p in pts if "loss" in p]
        acc = [(p["step"], 100 * p["knn_top1"]) for p in pts if "knn_top1" in p]
        label = f"{crit} {ratio}"
        ax1.plot(*zip(*loss), style, color=colors.get(crit, "gray"), alpha=0.6, label=label)
        ax2.plot(*zip(*acc), style, marker="o", ms=3, color=colors.get(crit, "gray"), alpha=0.6, label=label)
    ax1.set(xlabel="distillation step", ylabel="distillation loss (MSE)", yscale="log", title="distillation loss")
    if teacher_knn is not None:
        ax2.axhspan(100 * (teacher_knn - close), 100 * teacher_knn, color="gray", alpha=0.2,
                    label="teacher kNN (-0.5 pt)")
    ax2.set(xlabel="distillation step (0: pruned, before distillation)", ylabel=f"test kNN top-1 (%), k={knn_k}",
            title="recovery")
    for ax in (ax1, ax2):
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_demo_accuracy_vs_flops(results: dict[str, Any], path: Path) -> None:
    """The demo's teacher and students (mean and range over seeds, after distillation; hollow
    markers before it) at their FLOPs."""
    plt = pyplot()
    t = results["teacher"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([t["flops"] / 1e6], [100 * t["knn_top1"]], marker="*", s=200, color="black", label="teacher", zorder=3)
    markers = {"diversity": "o", "l2": "s", "random": "^", "diversity+comp": "D", "diversity+comp+global": "P"}
    for a in results["summary"]:
        m = markers.get(a.get("method", a["criterion"]), "x")
        ax.errorbar([a["flops"] / 1e6], [100 * a["knn_top1_after"]], yerr=[[100 * (a["knn_top1_after"] - a["knn_top1_after_min"])],
                    [100 * (a["knn_top1_after_max"] - a["knn_top1_after"])]], fmt=m, capsize=3,
                    label=f"{a.get('method', a['criterion'])} r={a['mlp_ratio']:g} distilled")
        ax.scatter([a["flops"] / 1e6], [100 * a["knn_top1_before"]], marker=m, facecolors="none", edgecolors="gray")
    ax.set(xlabel="MFLOPs per image", ylabel=f"kNN top-1 (%), k={results['knn_k']}",
           title="accuracy vs FLOPs (hollow: pruned, before distillation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
