"""`dgmr report`: the comparison table (params, FLOPs, throughput, accuracies, deltas) and
the PNG plots, from real eval results on generated data and a distillation run directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import dgmr
from dgmr.cli import main
from dgmr.core.errors import DgmrError
from dgmr.evaluate import eval_knn, eval_speed, save_result
from dgmr.report import render_report
from dgmr.models.sources import build_model, parse_spec

from helpers import TINY_VIT_KWARGS, TINY_VIT_SPEC, image_folder


def _metrics(run: Path, steps: int = 20) -> None:
    lines = []
    for s in range(1, steps + 1):
        d = {"step": s, "epoch": s // 10, "loss": 2.0 / s, "loss_pooled": 1.2 / s, "loss_tokens": 0.8 / s, "lr": 1e-4}
        if s % 10 == 0:
            d["knn_top1"] = 0.5 + s / 100
        lines.append(json.dumps(d))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 21, \"lo")  # torn last line of a live run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    colors = {"red": (210, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    train, val = root / "data" / "train", root / "data" / "val"
    image_folder(train, colors, 4, seed=0, jitter=30)
    image_folder(val, colors, 2, seed=1, jitter=30)
    torch.manual_seed(0)
    src = parse_spec(TINY_VIT_SPEC, TINY_VIT_KWARGS)
    teacher = build_model(src, pretrained=False)
    dgmr.save(teacher, root / "original", source=src)
    student, rec = dgmr.prune(teacher, mlp_ratio=1.0, source=src, progress=False)
    dgmr.save(student, root / "pruned", source=src, record=rec)
    run = root / "run"
    dgmr.save(student, run, source=src, extra={"distill": {"steps": 20}})  # stands in for a distilled student
    _metrics(run)
    results = []
    for name in ("original", "pruned", "run"):
        r = eval_knn(root / name, train, val, ks=(1, 3), cache_dir=False)
        save_result(r, root / f"knn_{name}.json")
        results.append(r)
    save_result(eval_speed([root / "original", root / "pruned", run], batch_size=2, repeats=2, warmup=1),
                root / "speed.json")
    return root, results


def test_report_table_and_plots(setup, tmp_path):
    root, knn = setup
    out = tmp_path / "rep"
    res = render_report([root / "knn_original.json", root / "knn_pruned.json", root / "speed.json", root / "run"], out)
    assert res["models"] == 3 and res["runs"] == 1
    md = (out / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| `")]
    assert [r.split("|")[2].strip() for r in rows] == ["original", "pruned", "distilled"]
    header = next(ln for ln in md.splitlines() if ln.startswith("| model"))
    assert "params" in header and "FLOPs/img" in header and "img/s" in header and "knn top-1 (data)" in header
    # deltas: params relative, accuracy in points, throughput as a ratio
    data = json.loads((out / "report.json").read_text())
    o, p, d = data["rows"]
    assert data["baseline"] == str(root / "original")
    assert p["params"] < o["params"] and p["params_ratio"] == pytest.approx(o["params"] / p["params"])
    assert f"({p['params'] / o['params'] - 1:+.1%})" in rows[1]
    assert p["knn top-1 (data)"] == knn[1]["top1"] and p["knn top-1 (data) delta"] == pytest.approx(knn[1]["top1"] - knn[0]["top1"])
    assert f"{100 * knn[1]['top1']:.1f}" in rows[1]
    assert p["speedup"] == pytest.approx(p["throughput"] / o["throughput"]) and f"(×{p['speedup']:.2f})" in rows[1]
    assert d["knn top-1 (data)"] is None  # the run's own eval result was not given
    assert data["runs"][0]["steps"] == 20 and data["runs"][0]["last"]["loss"] == pytest.approx(0.1)
    for png in ("recovery_run.png", "accuracy_vs_flops.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            assert sum(1 for c in im.convert("L").histogram() if c) > 10  # something was drawn
    assert "![recovery curve](recovery_run.png)" in md and "2 → 0.1 over 20 steps" in md
    assert not list(tmp_path.glob(".*tmp*"))


def test_report_from_dicts_exact_deltas(tmp_path):
    base = {"metric": "zeroshot", "model": "big", "role": "original", "params": 1000, "flops": 4000, "top1": 0.800,
            "data": "/x/imagenet/val"}
    small = {**base, "model": "small", "role": "pruned", "params": 400, "flops": 1000, "top1": 0.785}
    res = render_report([small, base], tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| `big` | original | 1.00k | 4.00k | 80.0 |" in md
    assert "| `small` | pruned | 400 (-60.0%) | 1.00k (-75.0%) | 78.5 (-1.5) |" in md
    assert "zeroshot top-1 (imagenet)" in md and res["plots"][0].endswith("accuracy_vs_flops.png")


def test_report_cli_and_mistakes(setup, tmp_path, capsys):
    root, _ = setup
    out = tmp_path / "cli"
    assert main(["report", str(root / "knn_original.json"), str(root / "knn_run.json"), str(root / "run"),
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["models"] == 2 and (out / "report.md").is_file()
    assert main(["report", str(root / "knn_original.json"), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DgmrError, match="not a dgmr eval result"):
        render_report([tmp_path / "junk.json"], tmp_path / "o3")
    assert not (tmp_path / "o3").exists()
    with pytest.raises(DgmrError, match="--baseline"):
        render_report([root / "knn_original.json"], tmp_path / "o4", baseline="nope")


def test_other_probe_protocols_and_tie_rules_get_their_own_columns():
    from dgmr.report.compare import metric_columns

    lbfgs = {"metric": "linear", "dataset": "ds", "top1": 0.3, "protocol": "lbfgs"}
    cb = {**lbfgs, "top1": 0.37, "protocol": "clip_benchmark"}
    assert set(metric_columns(lbfgs)) == {"linear top-1 (ds)"}
    assert set(metric_columns(cb)) == {"linear [clip_benchmark] top-1 (ds)"}
    rec = {"R@1": 0.5, "R@5": 0.9, "R@10": 1.0}
    ret = {"metric": "retrieval", "dataset": "coco", "image_to_text": rec, "text_to_image": rec, "mean_recall": 0.8}
    assert "retrieval mean recall (coco)" in metric_columns({**ret, "ties": "expected"})
    assert "retrieval mean recall (coco) [ties optimistic]" in metric_columns({**ret, "ties": "optimistic"})


@pytest.mark.parametrize("line, field", [(b'{"step": 3, "loss": "abc"}', "loss"), (b'\xff\xfe not utf-8', "JSON line"),
                                         (b'[1, 2]', "line")])
def test_report_refuses_a_bad_metrics_line_in_one_error(tmp_path, line, field):
    from dgmr.report.compare import read_metrics

    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"step": 1, "loss": 2.0}\n' + line + b'\n{"step": 5, "loss": 1.0}\n')
    with pytest.raises(DgmrError, match=f"metrics.jsonl:2: .*{field}"):
        read_metrics(p)
