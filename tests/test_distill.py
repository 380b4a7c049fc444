"""dgmr distill on tiny random-init ViTs and generated images (CPU, a few steps each)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dgmr
from dgmr.cli import main
from dgmr.data.unlabeled import TrainTransform, sample_generator
from dgmr.distill import DistillSettings, distill, feature_loss, load_checkpoint, lr_at, wd_at
from dgmr.models.sources import build_model, parse_spec

from helpers import TINY_VIT_KWARGS, TINY_VIT_SPEC, image_folder, run_cli, tiny_teacher_student, varied_run_inputs

TINY = TINY_VIT_KWARGS
SPEC = TINY_VIT_SPEC
KW = json.dumps(TINY)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A random-init teacher saved unpruned, its r=1 student, and 24 images + 2 corrupt + 1 non-image."""
    inputs = varied_run_inputs(tmp_path_factory.mktemp("distill"))
    root = inputs["root"]
    (root / "images" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = (root / "images" / "cat" / "001.png").read_bytes()
    (root / "images" / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "images" / "README.txt").write_text("not an image")
    return inputs


class _Stop(Exception):
    pass


def _stopped_then_resumed(args: list, run: Path, step: int, **kw) -> None:
    """A run interrupted right after ``step`` (an exception from on_step), then ``--resume``d."""
    def stop(info):
        if info["step"] == step:
            raise _Stop

    with pytest.raises(_Stop):
        distill(*args, run, on_step=stop, **kw)
    distill(None, None, None, run, resume=True, progress=False)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[float]:
    """The training losses (the step-0 row holds only the val_loss)."""
    return [r["loss"] for r in _metrics(run) if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_loss_decreases_corrupt_counted_and_export_loads(tiny, tmp_path):
    run = tmp_path / "run"
    r = distill(str(tiny["teacher"]), str(tiny["student"]), str(tiny["images"]), run, steps=12, batch_size=8,
                lr=2e-3, log_every=1, workers=0, progress=False)
    rows = _metrics(run)
    assert [row["step"] for row in rows] == list(range(0, 13))  # step 0: the val_loss before any update
    assert "val_loss" in rows[0] and "loss" not in rows[0]
    rows = rows[1:]
    for key in ("step", "epoch", "loss", "loss_pooled", "loss_tokens", "lr", "images_per_s"):
        assert all(key in row for row in rows), key
    losses = [row["loss"] for row in rows]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_pooled"] + rows[-1]["loss_tokens"], rel=1e-6)
    # 26 image files, 2 unreadable (garbage + truncated): skipped, counted, named; README.txt ignored
    assert r["unreadable_images"] == 2 and r["ignored_files"] == 1
    assert all(name.split(":")[0].endswith(("broken.jpg", "truncated.png")) for name in r["unreadable_examples"])
    assert r["epochs"] == pytest.approx(12 / 3)  # 26 files // 8 = 3 batches per epoch
    # the export is a dgmr directory like `dgmr prune` writes, and the trained weights differ from the student's
    cfg = json.loads((run / "dgmr.json").read_text())
    assert cfg["format"] == "dgmr" and cfg["prune"]["mlp_ratio"] == 1 and cfg["distill"]["steps"] == 12
    assert (run / "dgmr" / "kept_indices.safetensors").is_file()
    trained, pruned = dgmr.load(run), dgmr.load(tiny["student"])
    assert [s.hidden for s in dgmr.family_of(trained).mlps(trained)] == [192, 192]
    diff = max((a - b).abs().max().item() for a, b in zip(trained.state_dict().values(), pruned.state_dict().values()))
    assert diff > 1e-4
    # ... and timm itself opens it (its own layout: config.json beside the weights), with a card
    import timm

    native = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    assert "- distilled" in (run / "README.md").read_text() and "steps=12" in (run / "README.md").read_text()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(native(x), trained(x), atol=1e-5)
    # on augmented views of the images, the trained student is closer to the teacher than the pruned one was
    teacher = dgmr.load(tiny["teacher"])
    fam = dgmr.family_of(teacher)
    dc = fam.data_config(teacher)
    tr = TrainTransform(32, dc["mean"], dc["std"])
    files = sorted(tiny["images"].rglob("0*.png"))[:16]
    x = torch.stack([tr(Image.open(f).convert("RGB"), sample_generator(123, 0, i)) for i, f in enumerate(files)])
    with torch.no_grad():
        tf = fam.features(teacher, x)
        before = feature_loss(fam.features(pruned, x), tf)[0].item()
        after = feature_loss(fam.features(trained, x), tf)[0].item()
    assert after < before
    # the resolved settings are saved in the run directory
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["settings"]["lr"] == 2e-3 and saved["settings"]["betas"] == [0.9, 0.95]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from dgmr.distill import distill

    def on_step(info):
        if info["step"] == int(sys.argv[5]):
            os.kill(os.getpid(), signal.SIGKILL)

    distill(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], steps=8, batch_size=4, accum=2, lr=2e-3,
            ema=0.9, clip_grad=1.0, save_every=2, log_every=1, workers=0, progress=False, on_step=on_step)
""")


def test_resume_after_sigkill_matches_uninterrupted_run(tiny, tmp_path):
    args = [str(tiny["teacher"]), str(tiny["student"]), str(tiny["images"])]
    ref = tmp_path / "ref"
    distill(*args, ref, steps=8, batch_size=4, accum=2, lr=2e-3, ema=0.9, clip_grad=1.0, save_every=2, log_every=1,
            workers=0, progress=False)
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args, str(run), "5"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(run)["step"] == 4  # checkpoints at 2 and 4; steps 5 ran and were lost
    assert not (run / "dgmr.json").exists()  # no export from a killed run
    assert [r["step"] for r in _metrics(run)] == [0, 1, 2, 3, 4, 5]
    # resume through the CLI (teacher/student/data come from the run), with a DataLoader worker this time
    assert main(["distill", "--out", str(run), "--resume", "--workers", "1", "--no-progress"]) == 0
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in _metrics(run)] == list(range(0, 9))
    assert _losses(run) == pytest.approx(_losses(ref), rel=1e-6)


def _torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dgmr.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _gloo_args(tiny, run: Path) -> list[str]:
    return ["distill", "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--data",
            str(tiny["images"]), "--out", str(run), "--steps", "6", "--batch-size", "4", "--lr", "2e-3",
            "--log-every", "1", "--save-every", "3", "--workers", "0", "--ema", "0.9", "--json", "--device", "cpu",
            "--val-fraction", "0.25", "--eval-every", "2"]  # 7 held-out images: 4 + 3 on the two ranks


@pytest.fixture(scope="module")
def ddp_run(tiny) -> tuple[Path, subprocess.CompletedProcess]:
    run = tiny["root"] / "ddp"
    return run, _torchrun(_gloo_args(tiny, run))


@pytest.fixture(scope="module")
def one_process_val_loss(tiny) -> float:
    """The step-0 val_loss of the gloo runs' student and held-out images, in one process."""
    r = distill(str(tiny["teacher"]), str(tiny["student"]), str(tiny["images"]), tiny["root"] / "one", steps=1,
                batch_size=4, val_fraction=0.25, workers=0, progress=False, device="cpu")
    assert r["held_out"]["images"] == 7
    return r["step0_val_loss"]


def _check_gloo_run(run: Path, proc: subprocess.CompletedProcess, val0: float) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # rank 0 alone prints
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    assert summary["global_batch"] == 8
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(0, 7))
    assert rows[-1]["loss"] < 0.8 * rows[1]["loss"]
    # val_loss: each held-out image evaluated once over both ranks (one process gets the same value)
    assert rows[0]["val_loss"] == summary["step0_val_loss"] == pytest.approx(val0, rel=1e-5)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4, 6] and summary["held_out"]["images"] == 7
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 6 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert dgmr.load(run) is not None


def test_two_processes_gloo_ddp(ddp_run, one_process_val_loss):
    _check_gloo_run(*ddp_run, one_process_val_loss)


def test_two_processes_gloo_fsdp(tiny, tmp_path, ddp_run, one_process_val_loss):
    run = tmp_path / "fsdp"
    _check_gloo_run(run, _torchrun(_gloo_args(tiny, run) + ["--fsdp"]), one_process_val_loss)
    # FSDP2 trains exactly what DDP trains (same data split, same math on CPU), evaluating the EMA
    # swapped in and out between steps (the root's weights FSDP keeps gathered must not go stale)
    a, b = _weights(ddp_run[0]), _weights(run)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    vals = lambda rows: [r["val_loss"] for r in rows if "val_loss" in r]  # noqa: E731
    assert vals(_metrics(run)) == pytest.approx(vals(_metrics(ddp_run[0])), rel=1e-5)


def test_webdataset_shards_and_in_process_resume(tiny, tmp_path):
    import webdataset as wds

    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted(tiny["images"].rglob("0*.png"))[:20]
    for s in range(2):
        with wds.TarWriter(str(shards / f"shards-{s:04d}.tar")) as w:
            for i, f in enumerate(files[s::2]):
                w.write({"__key__": f"{s}_{i:04d}", "png": f.read_bytes(), "cls": b"7"})
            if s == 1:
                w.write({"__key__": "bad", "jpg": b"garbage bytes", "txt": b"a caption"})
    spec = str(shards / "shards-{0000..0001}.tar")
    common = dict(steps=6, batch_size=5, lr=2e-3, log_every=1, save_every=3, workers=0, progress=False)
    ref = distill(str(tiny["teacher"]), str(tiny["student"]), spec, tmp_path / "ref", **common)
    assert ref["unreadable_images"] == 1 and ref["epochs"] == pytest.approx(6 / 4)  # 21 samples // 5
    losses = _losses(tmp_path / "ref")
    assert losses[-1] < losses[0]

    _stopped_then_resumed([str(tiny["teacher"]), str(tiny["student"]), spec], tmp_path / "run", 4, **common)
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_in_memory_modules_and_pil_images_open_clip(tmp_path):
    """The demo path: built modules (open_clip tower), a list of PIL images, student trained in place."""
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "dgmr-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "dgmr-test-tiny-clip.json")
    torch.manual_seed(0)
    teacher = open_clip.create_model("dgmr-test-tiny-clip").eval()
    student = open_clip.create_model("dgmr-test-tiny-clip").eval()
    student.load_state_dict(teacher.state_dict())
    dgmr.prune(student, mlp_ratio=1, progress=False)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).resize((40, 40)) for _ in range(16)]
    text_before = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("visual.")}
    visual_before = {k: v.clone() for k, v in student.visual.state_dict().items()}
    r = distill(teacher, student, images, tmp_path / "run", steps=5, batch_size=8, lr=3e-3, log_every=1,
                progress=False, loss="cosine")
    assert r["family"] == "open_clip" and r["final_loss"] < r["first_loss"]
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in text_before.items())  # the text tower is not trained
    # the modules come back as they were given: eval mode, grad flags untouched
    assert not teacher.training and not student.training
    assert all(p.requires_grad for p in teacher.parameters()) and all(p.requires_grad for p in student.parameters())
    assert any(not torch.equal(v, student.visual.state_dict()[k]) for k, v in visual_before.items())
    assert (tmp_path / "run" / "model.safetensors").is_file()


def _err(capsys, argv: list[str]) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    err = err.strip()
    assert err.startswith("dgmr: error: ") and "\n" not in err, err
    return err


def test_bad_inputs_are_one_line_errors(tiny, tmp_path, capsys):
    base = ["distill", "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--steps", "2",
            "--batch-size", "4", "--workers", "0", "--no-progress"]
    assert "does not exist" in _err(capsys, base + ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    (junk / "b.csv").write_text("y")
    assert "no images in" in _err(capsys, base + ["--data", str(junk), "--out", str(tmp_path / "b")])
    swapped = ["distill", "--teacher", str(tiny["student"]), "--student", str(tiny["teacher"]), "--data",
               str(tiny["images"]), "--out", str(tmp_path / "c")]
    assert "wider than the teacher" in _err(capsys, swapped)
    narrow = ["distill", "--teacher", str(tiny["teacher"]), "--student", "timm:vit_small_patch16_224", "--random-init",
              "--model-kwargs", KW, "--data", str(tiny["images"]), "--out", str(tmp_path / "d")]
    assert "differs from the teacher's" in _err(capsys, narrow)
    with pytest.raises(dgmr.DgmrError, match="family"):
        distill(dgmr.load(tiny["teacher"]), torch.nn.Sequential(torch.nn.Linear(4, 4)), str(tiny["images"]),
                tmp_path / "d2", steps=1, progress=False)
    # same family and widths but a different token grid: feature shapes differ
    src = parse_spec(SPEC, dict(TINY, patch_size=16))
    dgmr.save(build_model(src, pretrained=False), tmp_path / "coarse", source=src)
    assert "features differ in shape" in _err(capsys, ["distill", "--teacher", str(tiny["teacher"]), "--student",
                                                       str(tmp_path / "coarse"), "--data", str(tiny["images"]),
                                                       "--out", str(tmp_path / "e"), "--steps", "1"])
    assert "nothing to resume" in _err(capsys, ["distill", "--out", str(tmp_path / "f"), "--resume"])
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("batch_size: 4\nlearning_rate: 3\n")
    assert "unknown distill setting 'learning_rate'" in _err(capsys, base + ["--data", str(tiny["images"]), "--out",
                                                                             str(tmp_path / "g"), "--config", str(cfg)])
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "d", "d2", "e", "g"))  # nothing written
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    assert "not empty" in _err(capsys, base + ["--data", str(tiny["images"]), "--out", str(full)])
    assert (full / "keep.txt").read_text() == "precious"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["distill", "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--data",
            str(tiny["images"]), "--out", str(run), "--steps", "6", "--batch-size", "4", "--workers", "0",
            "--lr", "1e30", "--warmup-steps", "0", "--save-every", "1", "--log-every", "1", "--no-progress"]
    err = _err(capsys, argv)
    assert "not finite" in err
    ckpt = load_checkpoint(run)
    assert ckpt["step"] >= 1 and all(torch.isfinite(v).all() for v in ckpt["student"].values())
    assert not (run / "dgmr.json").exists()
    # resuming with a different schedule is refused (the run's saved settings rule)
    assert "saved settings" in _err(capsys, ["distill", "--out", str(run), "--resume", "--lr", "1e-3"])


def test_config_file_flags_override_and_schedules(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch-size: 32\nbase_lr: 6.0e-5\nema: 0.997\nbetas: [0.9, 0.99]\n")
    s = DistillSettings.resolve(cfg, batch_size=16, lr=None)
    assert (s.batch_size, s.base_lr, s.ema, s.betas) == (16, 6e-5, 0.997, (0.9, 0.99))
    assert DistillSettings().betas == (0.9, 0.95) and DistillSettings().weight_decay == 0.04
    lrs = [lr_at(i, 100, 1e-3, 1e-6, 10) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-6, abs=1e-6)
    wds_ = [wd_at(i, 100, 0.04, 0.2) for i in range(100)]
    assert wds_[0] == pytest.approx(0.04) and wds_[-1] == pytest.approx(0.2)
    assert all(a <= b for a, b in zip(wds_, wds_[1:]))


def test_cli_config_file_with_flag_override_and_overwrite(tiny, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 2\nbatch-size: 4\nlr: 1.0e-3\nworkers: 0\nlog_every: 1\nloss: cosine\n")
    run = tmp_path / "run"
    argv = ["distill", "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--data",
            str(tiny["images"]), "--out", str(run), "--config", str(cfg), "--steps", "3", "--no-progress"]
    assert main(argv) == 0
    saved = json.loads((run / "run_config.json").read_text())["settings"]
    assert (saved["steps"], saved["batch_size"], saved["loss"]) == (3, 4, "cosine")  # flag beats file
    assert [r["step"] for r in _metrics(run)] == [0, 1, 2, 3]
    assert main(argv) == 2  # the run directory is not empty
    assert main(argv + ["--overwrite", "--steps", "1"]) == 0
    assert [r["step"] for r in _metrics(run)] == [0, 1]


def test_failed_compile_falls_back_to_eager_with_the_same_result(tiny, tmp_path, monkeypatch):
    """compile=on with a compiler that breaks at the first step: one warning, then the run is
    exactly the eager run (nothing was learned from the failed attempt)."""
    kw = dict(steps=3, batch_size=8, lr=2e-3, workers=0, progress=False, log_every=1)
    distill(str(tiny["teacher"]), str(tiny["student"]), str(tiny["images"]), tmp_path / "eager", compile="off", **kw)

    def broken_compile(module, *a, **k):
        def fail(*args, **kwargs):
            raise RuntimeError("inductor: no C++ compiler\nsecond line")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler"):
        r = distill(str(tiny["teacher"]), str(tiny["student"]), str(tiny["images"]), tmp_path / "fallback",
                    compile="on", **kw)
    assert r["steps"] == 3
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "fallback")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(tmp_path / "eager")[0]["val_loss"] == _metrics(tmp_path / "fallback")[0]["val_loss"]
    assert _losses(tmp_path / "eager") == _losses(tmp_path / "fallback")


def test_compile_setting_is_checked_and_mutable_on_resume():
    with pytest.raises(dgmr.DgmrError, match="unknown compile mode 'fast'"):
        DistillSettings.resolve(compile="fast")
    from dgmr.distill.settings import RESUME_MUTABLE

    assert "compile" in RESUME_MUTABLE and DistillSettings().compile == "auto"


def test_background_checkpoint_writer_is_atomic_and_reports_errors(tmp_path):
    from dgmr.distill.state import BackgroundWriter, to_cpu

    live = {"w": torch.ones(3), "nested": [torch.zeros(2), {"step": 4}]}
    snap = to_cpu(live)
    live["w"].add_(1)  # training goes on: the snapshot must not change
    writer = BackgroundWriter()
    writer.write(snap, tmp_path / "checkpoint.pt")
    writer.wait()
    got = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.equal(got["w"], torch.ones(3)) and got["nested"][1] == {"step": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    writer.write(snap, tmp_path / "missing-dir" / "checkpoint.pt")
    with pytest.raises(dgmr.DgmrError, match="cannot write the checkpoint .*missing-dir.* free there"):
        writer.wait()
    writer.wait()  # the error is reported once


def test_attention_backend_setting(tiny, tmp_path):
    """The attention backend is a setting: checked, recorded, and (math on a CPU) trains."""
    with pytest.raises(dgmr.DgmrError, match="unknown attention backend 'fast'"):
        DistillSettings.resolve(attention="fast")
    r = distill(str(tiny["teacher"]), str(tiny["student"]), str(tiny["images"]), tmp_path / "run", steps=2,
                batch_size=8, workers=0, progress=False, attention="math")
    cfg = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert r["steps"] == 2 and cfg["settings"]["attention"] == "math"


def test_resume_is_bit_identical_with_drop_path(tmp_path):
    """Drop-path draws from the global RNG while training: starting the DataLoader must not draw
    from it too, or a resumed run (RNG restored from the checkpoint) would drift."""
    tiny_teacher_student(tmp_path, drop_path_rate=0.5)
    image_folder(tmp_path / "images", ["a", "b"], 12, style="noise", size=(40, 40))
    args = [str(tmp_path / "teacher"), str(tmp_path / "student"), str(tmp_path / "images")]
    kw = dict(steps=8, batch_size=4, lr=2e-3, log_every=1, save_every=2, workers=0, progress=False)
    distill(*args, tmp_path / "ref", **kw)

    _stopped_then_resumed(args, tmp_path / "run", 4, **kw)
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in rows]  # noqa: E731
    assert untimed(_metrics(tmp_path / "ref")) == untimed(_metrics(tmp_path / "run"))  # losses and val_loss too


def test_only_unreadable_images_fail_before_any_export(tmp_path, cli):
    """Fewer steps than an epoch used to 'succeed' with loss 0 and export an untrained student."""
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(8):
        (root / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg " + bytes([i]))
    teacher, student = tiny_teacher_student(tmp_path)
    code, _, err = cli("distill", "--teacher", teacher, "--student", student, "--data", root, "--out", tmp_path / "run",
                       "--steps", "1", "--batch-size", "4", "--workers", "0", "--no-progress", "--json")
    assert code == 2 and "no readable image" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "summary.json").exists()


_ANY_RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from dgmr.core import dist as D

info = D.init("cpu")
real_backend = dist.get_backend
dist.get_backend = lambda *a: "nccl"  # as under NCCL: any_rank must take a gloo group of its own
votes = [D.any_rank(info.rank == 1, info), D.any_rank(False, info)]
group = D._host_group()
same = group is D._host_group() and group is not None
del group
dist.get_backend = real_backend
D.cleanup(info)
with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:  # one file each: stdout interleaves
    json.dump({"rank": info.rank, "votes": votes, "twin_group_reused": same}, f)
"""


def test_any_rank_agrees_on_the_host_beside_an_nccl_group(tmp_path):
    """The per-step stop vote of distill: one rank's flag reaches every rank, through a gloo
    group made once (under NCCL a CUDA tensor read back would sync each step with the GPU)."""
    script = tmp_path / "any_rank.py"
    script.write_text(_ANY_RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert rows == [{"rank": r, "votes": [True, False], "twin_group_reused": True} for r in (0, 1)]
