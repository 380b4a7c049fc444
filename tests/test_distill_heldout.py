"""The held-out loss of dgmr distill: val_loss from step 0, the lr fitted to the start, the best
export, early stopping and the target, resume, and their bad inputs (tiny random-init ViTs, CPU)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dgmr.core.errors import DgmrError
from dgmr.data.unlabeled import ShardImages, resolve_data, split_held_out
from dgmr.distill import distill, load_checkpoint
from dgmr.distill.lr_rule import FLOOR, FULL_AT, choose_peak_lr
from dgmr.distill.rundir import MetricsLog
from dgmr.distill.settings import DistillSettings
from dgmr.distill.validation import ValLoss

from helpers import run_cli, varied_run_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return varied_run_inputs(tmp_path_factory.mktemp("heldout"))


def _args(tiny) -> list[str]:
    return [str(tiny["teacher"]), str(tiny["student"]), str(tiny["images"])]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# a constant lr the tiny student overshoots with: val_loss falls at step 1, then rises
BUMPY = dict(steps=10, batch_size=8, lr=4e-3, min_lr=4e-3, warmup_steps=0, eval_every=1, log_every=1, workers=0,
             progress=False)


def test_val_loss_from_step_0_lr_choice_and_tensorboard(tiny, tmp_path):
    run = tmp_path / "run"
    r = distill(*_args(tiny), run, steps=4, batch_size=8, eval_every=2, log_every=1, workers=0, progress=False)
    rows = _metrics(run)
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert "loss" not in rows[0] and rows[0]["val_loss"] == r["step0_val_loss"] > 0
    assert rows[0]["val_loss"] == pytest.approx(rows[0]["val_loss_pooled"] + rows[0]["val_loss_tokens"], rel=1e-6)
    assert [row["step"] for row in rows if "val_loss" in row] == [0, 2, 4]  # and at every evaluation
    assert r["final_val_loss"] == rows[-1]["val_loss"] and r["best_val_loss"] == min(x["val_loss"] for x in rows
                                                                                       if "val_loss" in x)
    assert r["held_out"]["images"] == 1 and r["eval_every"] == 2  # 2% of 24 images, rounded up
    # the lr: the paper's (1e-4 x 8 / 256) scaled by the step-0 val_loss against the teacher's feature scale
    lr = r["lr"]
    assert lr["rule"] == "fit" and lr["paper_lr"] == pytest.approx(1e-4 * 8 / 256)
    assert lr["relative_loss"] == pytest.approx(r["step0_val_loss"] / lr["teacher_scale"])
    assert lr["factor"] == min(1.0, max(FLOOR, lr["relative_loss"] / FULL_AT)) and lr["why"]
    assert r["peak_lr"] == pytest.approx(lr["paper_lr"] * lr["factor"])
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["lr_choice"] == lr and saved["peak_lr"] == r["peak_lr"] and saved["held_out"]["digest"]
    # TensorBoard gets val_loss as a scalar from step 0 (the writer is faked: tensorboard is optional)
    log = MetricsLog(tmp_path / "tb", enabled=True, tensorboard=False, step=0)
    seen = []
    log.writer = type("W", (), {"add_scalar": lambda self, k, v, step: seen.append((k, step)), "close": lambda s: 0})()
    (tmp_path / "tb").mkdir()
    for row in rows:
        log.write(row)
    assert [step for k, step in seen if k == "distill/val_loss"] == [0, 2, 4]


def test_best_export_early_stop_and_target(tiny, tmp_path):
    # an lr far too high: val_loss only rises, early stopping ends the run, the start is exported
    r = distill(*_args(tiny), tmp_path / "stop", **{**BUMPY, "lr": 0.05, "min_lr": 0.05}, early_stop=2, min_delta=0)
    assert r["steps"] == 2 and r["stopped"] == "early_stop" and r["best_step"] == 0
    assert r["exported"] == {"weights": "best", "step": 0, "val_loss": r["step0_val_loss"]}
    assert _same(_weights(tmp_path / "stop"), _weights(tiny["student"]))  # bit for bit the student it started as
    assert json.loads((tmp_path / "stop" / "dgmr.json").read_text())["distill"]["exported"]["step"] == 0
    last = distill(*_args(tiny), tmp_path / "last", **{**BUMPY, "lr": 0.05, "min_lr": 0.05, "steps": 2}, export="last")
    assert last["exported"]["weights"] == "last" and last["exported"]["step"] == 2
    assert not _same(_weights(tmp_path / "last"), _weights(tiny["student"]))
    # the target: reached at step 0 there is nothing to train, and the student is exported as it is
    r = distill(*_args(tiny), tmp_path / "target", **BUMPY, target_val_loss=1e6)
    assert r["steps"] == 0 and r["stopped"] == "target_val_loss" and r["images_seen"] == 0
    assert _same(_weights(tmp_path / "target"), _weights(tiny["student"]))
    # ... reached later, the run stops at the first evaluation at or below it
    rows = _metrics(tmp_path / "last")
    r = distill(*_args(tiny), tmp_path / "target2", **{**BUMPY, "lr": 2e-3, "min_lr": 2e-3},
                target_val_loss=0.95 * rows[0]["val_loss"])
    vals = [x["val_loss"] for x in _metrics(tmp_path / "target2")]
    assert r["stopped"] == "target_val_loss" and vals[-1] <= 0.95 * vals[0] < min(vals[:-1])


class _Stop(Exception):
    pass


def test_resume_keeps_best_weights_and_patience(tiny, tmp_path):
    """Stopped after the best step and between two evaluations without improvement, a resumed
    run stops where the uninterrupted one did and exports the same (best, not last) weights."""
    kw = dict(BUMPY, early_stop=2, min_delta=0, save_every=1)
    ref = distill(*_args(tiny), tmp_path / "ref", **kw)
    assert ref["stopped"] == "early_stop" and 0 < ref["best_step"] < ref["steps"] < BUMPY["steps"]
    assert not _same(_weights(tmp_path / "ref"), load_checkpoint(tmp_path / "ref")["student"])  # best, not last
    stop_at = ref["best_step"] + 1

    def stop(info):
        if info["step"] == stop_at:
            raise _Stop

    with pytest.raises(_Stop):
        distill(*_args(tiny), tmp_path / "run", on_step=stop, **kw)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["held_out"]["best_step"] == ref["best_step"] and ckpt["held_out"]["waited"] == 1
    assert ckpt["best_weights"] is not None  # the best are not this checkpoint's own weights
    got = distill(None, None, None, tmp_path / "run", resume=True, progress=False)
    for key in ("steps", "stopped", "best_step", "best_val_loss", "step0_val_loss", "exported", "peak_lr", "lr"):
        assert got[key] == ref[key], key
    assert _same(_weights(tmp_path / "run"), _weights(tmp_path / "ref"))
    assert [x["step"] for x in _metrics(tmp_path / "run")] == [x["step"] for x in _metrics(tmp_path / "ref")]


def test_resume_refuses_other_held_out_images(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    distill(*_args(tiny), run, steps=2, batch_size=8, workers=0, progress=False, save_every=1)
    (run / "summary.json").unlink()
    code, _, err = run_cli(capsys, "distill", "--out", str(run), "--resume", "--val-fraction", "0.2")
    assert code == 2 and "saved settings; val_fraction was 0.02, now 0.2" in err
    code, _, err = run_cli(capsys, "distill", "--out", str(run), "--resume", "--val-data", str(tiny["images"]))
    assert code == 2 and "held out a slice of its data" in err
    # the data changed under the run: its held-out slice is no longer the same images
    saved = json.loads((run / "run_config.json").read_text())
    saved["held_out"]["digest"] = "0" * 16
    (run / "run_config.json").write_text(json.dumps(saved))
    code, _, err = run_cli(capsys, "distill", "--out", str(run), "--resume")
    assert code == 2 and "held-out images differ from the run's" in err and err.count("\n") == 1


def test_held_out_split_is_seeded_disjoint_and_skipped_in_shards(tmp_path):
    items = [torch.full((3, 4, 4), i / 50) for i in range(50)]
    src = resolve_data(items)
    train, val = split_held_out(src, 5, seed=3)
    again, val2 = split_held_out(src, 5, seed=3)
    ids = lambda xs: sorted(round(float(x[0, 0, 0]) * 50) for x in xs)  # noqa: E731
    assert ids(val) == ids(val2) and len(val) == 5 and train.num_samples == 45
    assert sorted(ids(val) + ids(train.items)) == list(range(50))  # disjoint, nothing lost
    assert ids(split_held_out(src, 5, seed=4)[1]) != ids(val)
    with pytest.raises(DgmrError, match="leaves none to train on"):
        split_held_out(src, 50, seed=0)
    # WebDataset shards: the held-out samples are read once and passed over by the training stream
    import io

    import webdataset as wds
    from PIL import Image

    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"s-{s}.tar")) as w:
            for i in range(6):
                buf = io.BytesIO()
                Image.new("RGB", (4, 4), (10 * (6 * s + i), 0, 0)).save(buf, format="PNG")
                w.write({"__key__": f"{s}_{i}", "png": buf.getvalue()})
    shards = resolve_data(str(tmp_path / "s-{0..1}.tar"))
    train, val = split_held_out(shards, 3, seed=0)
    assert train.num_samples == 9 and len(val) == 3 and train.exclude == {v.name for v in val}
    red = lambda img, g: torch.tensor(img.getpixel((0, 0))[0] // 10)  # noqa: E731  (the sample's number)
    stream = iter(ShardImages(train.items, red, exclude=train.exclude))
    trained = {int(next(stream)[0]) for _ in range(9)}  # one pass
    held = {int(Image.open(io.BytesIO(v.data)).getpixel((0, 0))[0]) // 10 for v in val}
    assert len(held) == 3 and trained == set(range(12)) - held


def test_lr_rule_explicit_paper_and_fit():
    start = ValLoss(loss=0.002, pooled=0.001, tokens=0.001, images=4, scale=4.0)
    s = DistillSettings.resolve(base_lr=4e-3)
    lr, why = choose_peak_lr(s, 64, start)
    assert why["paper_lr"] == pytest.approx(1e-3) and why["relative_loss"] == pytest.approx(5e-4)
    assert lr == pytest.approx(1e-3 * max(FLOOR, 5e-4 / FULL_AT)) and why["factor"] < 1
    far = ValLoss(loss=2.0, pooled=1.0, tokens=1.0, images=4, scale=4.0)
    assert choose_peak_lr(s, 64, far)[0] == pytest.approx(1e-3)  # far from the teacher: the paper's lr
    assert choose_peak_lr(DistillSettings.resolve(base_lr=4e-3, lr_rule="paper"), 64, start)[0] == pytest.approx(1e-3)
    lr, why = choose_peak_lr(DistillSettings.resolve(lr=3e-5), 64, start)
    assert lr == 3e-5 and why["rule"] == "lr"  # an explicit lr wins
    assert choose_peak_lr(s, 64, None)[0] == pytest.approx(1e-3)  # nothing measured: the paper's


def _err(capsys, argv: list[str]) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    err = err.strip()
    assert err.startswith("dgmr: error: ") and "\n" not in err, err
    return err


def test_held_out_bad_inputs_are_one_line_errors(tiny, tmp_path, capsys):
    base = ["distill", "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--data",
            str(tiny["images"]), "--steps", "2", "--batch-size", "4", "--workers", "0", "--no-progress"]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg " + bytes([i]))
    assert "no readable image among the 3 held-out images" in _err(
        capsys, base + ["--val-data", str(corrupt), "--out", str(tmp_path / "a")])
    assert "leaves none to train on" in _err(capsys, base + ["--val-fraction", "0.99", "--out", str(tmp_path / "b")])
    assert "need evaluations" in _err(capsys, base + ["--val-fraction", "0", "--early-stop", "3",
                                                      "--out", str(tmp_path / "c")])
    assert "need evaluations" in _err(capsys, base + ["--val-fraction", "0", "--target-val-loss", "0.1",
                                                      "--out", str(tmp_path / "d")])
    assert "eval_every must be >= 1" in _err(capsys, base + ["--eval-every", "0", "--out", str(tmp_path / "e")])
    assert "min_delta must be in [0, 1)" in _err(capsys, base + ["--min-delta", "1", "--out", str(tmp_path / "f")])
    assert not any((tmp_path / n).exists() for n in "abcdef")  # nothing written
    # no held-out images at all: no evaluations, the last weights exported, and it says why
    r = distill(*_args(tiny), tmp_path / "none", steps=2, batch_size=8, workers=0, progress=False, val_fraction=0)
    assert r["step0_val_loss"] is None and r["exported"]["weights"] == "last" and "no held-out" in r["exported"]["why"]
    assert r["lr"]["rule"] == "fit" and r["peak_lr"] == pytest.approx(r["lr"]["paper_lr"])
    assert all("val_loss" not in row for row in _metrics(tmp_path / "none"))
    assert math.isfinite(r["final_loss"])


def test_tracker_counts_relative_improvements_and_feeds_the_progress_bar():
    from dgmr.distill.validation import Tracker, progress_postfix

    s = DistillSettings.resolve(early_stop=2, min_delta=0.1)
    t = Tracker()
    assert progress_postfix(None, t) == {}  # nothing measured yet
    assert t.update(0, 1.0, s) and t.update(5, 0.95, s)  # the best, but less than 10% below 1.0
    assert t.waited == 1 and t.stopped is None and t.best_step == 5
    assert t.update(10, 0.85, s) and t.waited == 0 and t.reference == 0.85  # 15% below 1.0: the count resets
    assert not t.update(15, 0.9, s) and t.stopped is None
    assert not t.update(20, 0.86, s) and t.stopped == "early_stop" and (t.best, t.best_step) == (0.85, 10)
    row = {"loss": 0.123456, "lr": 1e-3, "images_per_s": 12.34}
    assert progress_postfix(row, t) == {"loss": "0.1235", "val": "0.86", "best": "0.85@10", "lr": "1.00e-03",
                                        "img_s": "12.3"}
    assert t.summary() == {"step0_val_loss": 1.0, "best_step": 10, "best_val_loss": 0.85, "final_val_loss": 0.86,
                           "stopped": "early_stop"}
    last = Tracker()
    last.update(0, 1.0, DistillSettings.resolve(target_val_loss=2.0), final=True)  # the last step: nothing to stop
    assert last.stopped is None
