"""The old and the new distillation defaults side by side, on the demo's students, same seeds.

`old`: the demo's recipe before held-out evaluation: a fixed peak lr of 1e-3 for every
student (the paper's rule, base_lr x 64 / 256 with the demo's base lr), all steps, the last
weights exported. `new`: `dgmr distill`'s defaults as the demo uses them: the lr fitted to the
student's step-0 val_loss (lr_rule fit), the best weights exported, early stopping (patience 2
evaluations, min_delta 10%). Both hold out the same 2% of the train images and log val_loss
from step 0, so both curves can be compared; the teacher is trained once and shared.

Printed per method and ratio (over seeds): the highest val_loss over its step-0 value, kNN
before and after, the first kNN-scored step within 0.5 point of the teacher, steps trained,
and the wall time of each demo.

    python benchmarks/distill_defaults.py [--out /tmp/distill-defaults] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from dgmr.demo import DemoSettings, run_demo


def variants(out: Path, quick: bool) -> dict[str, DemoSettings]:
    old = dataclasses.replace(DemoSettings.make(out / "old", quick=quick), distill_lr=1e-3, early_stop=None,
                              export="last")
    return {"old": old, "new": DemoSettings.make(out / "new", quick=quick)}


def finished(settings: DemoSettings) -> dict[str, Any] | None:
    """The results of a demo already run into ``settings.out`` with these settings (min_delta
    means nothing without early stopping), else None."""
    path = Path(settings.out) / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    skip = {"out"} | ({"min_delta"} if settings.early_stop is None else set())
    mine = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(settings))).items() if k not in skip}
    theirs = {k: v for k, v in results["settings"].items() if k not in skip}
    return results if mine == theirs else None


def by_method(results: dict[str, Any]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in results["students"]:
        groups.setdefault((row["method"], row["mlp_ratio"]), []).append(row)
    return groups


def side_by_side(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    old, new = by_method(runs["old"]), by_method(runs["new"])
    rows = []
    for key in old:
        o, n = old[key], new[key]
        rows.append({
            "method": key[0], "mlp_ratio": key[1], "seeds": [r["seed"] for r in o],
            "val_max_ratio": [max(r["val_loss_max_ratio"] for r in o), max(r["val_loss_max_ratio"] for r in n)],
            "knn_before": [r["knn_top1_before"] for r in o],
            "knn_after_old": [r["knn_top1_after"] for r in o], "knn_after_new": [r["knn_top1_after"] for r in n],
            "close_old": [r["knn_close_step"] for r in o], "close_new": [r["knn_close_step"] for r in n],
            "steps_old": [r["distill_steps"] for r in o], "steps_new": [r["distill_steps"] for r in n],
            "lr_new": [r["peak_lr"] for r in n],
        })
    return rows


def pct(xs: list[float]) -> str:
    return "/".join(f"{100 * x:.1f}" for x in xs)


def show(rows: list[dict[str, Any]], runs: dict[str, dict[str, Any]]) -> None:
    t = runs["new"]["teacher"]
    print(f"teacher kNN {100 * t['knn_top1']:.1f}; wall: old {runs['old']['wall_seconds']:.0f} s, "
          f"new {runs['new']['wall_seconds']:.0f} s (the teacher trained in the first run is reused)")
    head = ("method", "r", "val max/step0 old→new", "kNN before", "kNN after old", "kNN after new",
            "≈teacher step old", "new", "steps old", "new", "peak lr new")
    print(" | ".join(head))
    for r in rows:
        fmt = lambda xs: ",".join("-" if x is None else str(x) for x in xs)  # noqa: E731
        print(" | ".join([r["method"], f"{r['mlp_ratio']:g}", f"{r['val_max_ratio'][0]:.2f}→{r['val_max_ratio'][1]:.2f}",
                          pct(r["knn_before"]), pct(r["knn_after_old"]), pct(r["knn_after_new"]), fmt(r["close_old"]),
                          fmt(r["close_new"]), fmt(r["steps_old"]), fmt(r["steps_new"]),
                          ",".join(f"{x:.1e}" for x in r["lr_new"])]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/distill-defaults")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick (one seed, 20 steps)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    out = Path(args.out)
    runs = {}
    for name, settings in variants(out, args.quick).items():
        if name == "new" and (out / "old" / "teacher").is_dir() and not (out / "new" / "teacher").exists():
            (out / "new").mkdir(parents=True, exist_ok=True)
            shutil.copytree(out / "old" / "teacher", out / "new" / "teacher")  # the same teacher
        runs[name] = finished(settings) or run_demo(settings.out, settings=settings, progress=False)
    rows = side_by_side(runs)
    show(rows, runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "teacher": runs["new"]["teacher"],
                                               "wall": {k: v["wall_seconds"] for k, v in runs.items()},
                                               "checks": {k: v["checks"] for k, v in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
