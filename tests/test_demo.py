"""`dgmr demo --quick` end to end: files, finite numbers, a real teacher, distillation that helps."""
from __future__ import annotations

import json
import math

import pytest

from dgmr.cli import main

TIMING = {"images_per_s", "distill_seconds"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_demo_writes_everything(demo_dir):
    for name in ("results.json", "report.md", "recovery.png", "accuracy_vs_flops.png", "teacher/model.safetensors"):
        assert (demo_dir / name).is_file() and (demo_dir / name).stat().st_size > 0, name
    assert (demo_dir / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (demo_dir / "report.md").read_text()
    assert "| teacher |" in report and "diversity r=1" in report and "random r=0.5" in report
    assert "diversity+comp r=1" in report and "diversity+comp+global r=0.5" in report


def test_results_schema_and_numbers(demo_dir):
    r = json.loads((demo_dir / "results.json").read_text())
    t = r["teacher"]
    for key in ("params", "flops", "knn_top1", "head_top1", "images_per_s"):
        assert _finite(t[key]) and t[key] > 0, key
    # ten classes: chance is 10%; the demo teacher must be far above it even in --quick
    assert t["knn_top1"] > 0.6 and t["head_top1"] > 0.5
    rows = r["students"]
    assert {(s["criterion"], s["mlp_ratio"]) for s in rows} == {(c, m) for c in ("diversity", "l2", "random") for m in (1.0, 0.5)}
    keys = ("criterion", "mlp_ratio", "seed", "params", "flops", "images_per_s", "knn_top1_before", "head_top1_before",
            "knn_top1_after", "head_top1_after")
    for s in rows:
        for key in keys[2:]:
            assert _finite(s[key]), (key, s)
        for key in keys[6:]:
            assert 0 <= s[key] <= 1
        assert s["params"] < t["params"] and s["flops"] < t["flops"]
        if s["calibration"] is None:  # distillation lowers the distillation loss of a weights-only prune
            assert s["loss_last"] < s["loss_first"], s
    assert _finite(r["wall_seconds"]) and r["wall_seconds"] > 0


def test_calibrated_students_start_near_the_teacher(demo_dir):
    r = json.loads((demo_dir / "results.json").read_text())
    t, rows = r["teacher"], r["students"]
    plain = {s["mlp_ratio"]: s for s in rows if s["method"] == "diversity"}
    cal = [s for s in rows if s["calibration"] is not None]
    assert {(s["method"], s["mlp_ratio"]) for s in cal} == {
        ("diversity+comp", 1.0), ("diversity+comp", 0.5), ("diversity+comp+global", 0.5)}
    for s in cal:
        assert s["calibration"] == {"images": 256, "compensate": True, "criterion": "diversity",
                                    "allocate": "global" if s["method"].endswith("global") else "uniform"}
        # the refit brings the cut model back towards the teacher before any distillation
        assert s["knn_top1_before"] > plain[s["mlp_ratio"]]["knn_top1_before"]
        assert s["knn_top1_before"] >= t["knn_top1"] - 0.03
        assert s["loss_first"] < plain[s["mlp_ratio"]]["loss_first"] / 5
        step = s["knn_close_step"]
        assert step is None or 0 <= step <= s["distill_steps"]
    assert all(s["calibration"] is None for s in rows if s not in cal)


def test_rerun_reuses_teacher_and_is_deterministic(demo_dir, capsys):
    first = json.loads((demo_dir / "results.json").read_text())
    assert first["teacher"]["train"]["cached"] is False
    assert main(["demo", "--quick", "--out", str(demo_dir), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["teacher"]["train"]["cached"] is True
    strip = lambda rows: [{k: v for k, v in row.items() if k not in TIMING} for row in rows]  # noqa: E731
    assert strip(second["students"]) == strip(first["students"])
    assert second["teacher"]["knn_top1"] == first["teacher"]["knn_top1"]
