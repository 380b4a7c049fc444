"""Runs that used to end silently wrong: a random teacher rebuilt differently on resume, a run
reading mostly broken images, a kill during the export (docs/failures.md)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dgmr.distill import distill
from dgmr.core.errors import DgmrError

from helpers import TINY_VIT_KWARGS, TINY_VIT_SPEC, image_folder, tiny_run_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return tiny_run_inputs(tmp_path_factory.mktemp("runs"), 4)


class _Stop(Exception):
    pass


def test_random_init_teacher_is_seeded_and_resume_rebuilds_it(tiny, tmp_path):
    kw = dict(steps=4, batch_size=4, lr=2e-3, save_every=2, log_every=1, workers=0, progress=False, device="cpu",
              random_init=True, model_kwargs=TINY_VIT_KWARGS)
    args = (TINY_VIT_SPEC, str(tiny["student"]), str(tiny["images"]))
    ref = distill(*args, tmp_path / "ref", **kw)

    def stop(info):
        if info["step"] == 2:
            raise _Stop

    run = tmp_path / "run"
    with pytest.raises(_Stop):
        distill(*args, run, on_step=stop, **kw)
    got = distill(None, None, None, run, resume=True, progress=False)
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same teacher after the resume (was: loss 2.7 -> 4.1)
    assert got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-6)
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["random_init_seeded"] is True and saved["settings"]["seed"] == 0
    # another seed, another teacher
    other = distill(*args, tmp_path / "seed1", **{**kw, "seed": 1})
    assert other["first_loss"] != ref["first_loss"]
    # a run an older dgmr started (no seed recorded): its teacher cannot be rebuilt, so no resume
    del saved["random_init_seeded"]
    (run / "run_config.json").write_text(json.dumps(saved))
    with pytest.raises(DgmrError, match="without a seed"):
        distill(None, None, None, run, resume=True, progress=False)


def test_mostly_unreadable_data_warns_in_the_summary(tiny, tmp_path, cli):
    data = tmp_path / "data"
    image_folder(data, ["a"], 6, style="noise", size=(36, 36))
    for i in range(2):
        (data / "a" / f"broken{i}.png").write_bytes(b"\x89PNG broken")
    argv = ["distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data", data, "--steps", "2",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress", "--no-tensorboard", "--json"]
    code, out, err = cli(*argv, "--out", tmp_path / "r1")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["unreadable_fraction"] == pytest.approx(0.25)  # 2 epochs of 8 files, 2 bad each time
    assert "25% of the image reads failed" in summary["warning"] and "threshold 10%" in summary["warning"]
    assert "dgmr: WARNING: 25% of the image reads failed" in err
    assert json.loads((tmp_path / "r1" / "summary.json").read_text())["warning"] == summary["warning"]
    code, out, err = cli(*argv, "--out", tmp_path / "r2", "--unreadable-warn", "0.3")
    assert code == 0 and "warning" not in json.loads(out) and "WARNING" not in err


KILL_IN_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import dgmr.models.artifact as artifact
    from dgmr.cli import main

    save_model = artifact.save_model
    def killed(model, path, **kw):
        save_model(model, path, **kw)
        os.kill(os.getpid(), signal.SIGKILL)
    artifact.save_model = killed
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_during_export_then_resume_reports_the_final_loss(tiny, tmp_path, cli):
    run = tmp_path / "run"
    argv = ["distill", "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--data",
            str(tiny["images"]), "--out", str(run), "--steps", "2", "--batch-size", "4", "--workers", "0",
            "--log-every", "1", "--device", "cpu", "--no-progress", "--no-tensorboard"]
    proc = subprocess.run([sys.executable, "-c", KILL_IN_EXPORT, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [p.name for p in run.glob(".*")]  # the partial export a kill leaves: ..export-<pid>.tmp-<pid>-<hex>
    assert left and all(".export-" in n for n in left) and not (run / "dgmr.json").exists()
    code, out, err = cli("distill", "--out", run, "--resume", "--no-progress", "--json")
    assert code == 0, err
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads(out)["final_loss"] == last["loss"] is not None  # was null: no step ran after the resume
    assert json.loads((run / "dgmr.json").read_text())["distill"]["final_loss"] == last["loss"]
    assert not [p.name for p in run.glob(".*")]  # the dead process's .export-<pid> is gone
