"""A full disk (a patched writer raising ENOSPC) at every write: one error line naming the path
and the free space, the previous file or output intact, no temporary file left."""
from __future__ import annotations

import errno
import json
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dgmr.models.artifact as artifact
from dgmr.distill import load_checkpoint
from dgmr.io.output import write_json

from helpers import TINY_VIT_ARGV, image_folder, tiny_teacher_student

pytestmark = pytest.mark.usefixtures("one_thread")


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def _full_disk_error(code: int, err: str, path: Path) -> None:
    assert code == 2, err
    err = err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress bar
    assert err.startswith("dgmr: error: cannot write "), err
    assert str(path) in err and "No space left on device" in err and " free there)" in err, err


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob(".*") if not p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("storage")
    tiny_teacher_student(root)
    image_folder(root / "images", ["a", "b"], 4, style="noise", size=(36, 36))
    return {"teacher": root / "teacher", "student": root / "student", "images": root / "images"}


def _distill(tiny, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data", tiny["images"],
            "--out", out, "--steps", "4", "--batch-size", "4", "--workers", "0", "--log-every", "1",
            "--save-every", "2", "--device", "cpu", "--no-progress", "--no-tensorboard", *extra]


def test_prune_on_a_full_disk_keeps_the_previous_output(tmp_path, cli, monkeypatch):
    out = tmp_path / "pruned"
    assert cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", out)[0] == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full(model, path, **kw):
        Path(path).write_bytes(b"half a tensor")  # what a full disk leaves: a partial file
        raise _enospc(path)

    monkeypatch.setattr(artifact, "save_model", full)
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "2", "--out", out, "--overwrite")
    _full_disk_error(code, err, out)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no .pruned.tmp-*, no lock


def test_distill_checkpoint_export_and_resume_on_a_full_disk(tiny, tmp_path, cli, monkeypatch):
    run = tmp_path / "run"
    save, calls = torch.save, []

    def second_save_fails(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1152 vs 1050")
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", second_save_fails)
    code, _, err = cli(*_distill(tiny, run))
    assert code == 2 and err.startswith(f"dgmr: error: cannot write the checkpoint {run / 'checkpoint.pt'}: "), err
    assert err.count("\n") == 1 and " free there)" in err
    assert load_checkpoint(run)["step"] == 2 and _hidden(run) == []  # the previous checkpoint stays the good one
    monkeypatch.setattr(torch, "save", save)

    # resume: metrics.jsonl must be cut back to step 2 (it has steps 3, 4); the disk is full for that too
    real_write_text = pathlib.Path.write_text

    def write_text(self, *a, **kw):
        if self.name.startswith(".metrics.jsonl.tmp-"):
            real_write_text(self, "{\"step\": 1")
            raise _enospc(self)
        return real_write_text(self, *a, **kw)

    metrics_before = (run / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    _full_disk_error(*cli("distill", "--out", run, "--resume", "--no-progress")[::2], run / "metrics.jsonl")
    assert (run / "metrics.jsonl").read_bytes() == metrics_before and _hidden(run) == []
    monkeypatch.setattr(pathlib.Path, "write_text", real_write_text)

    # the export: the run trains to the end, then the disk is full for the student's weights
    def full(model, path, **kw):
        Path(path).write_bytes(b"half a tensor")
        raise _enospc(path)

    monkeypatch.setattr(artifact, "save_model", full)
    code, _, err = cli("distill", "--out", run, "--resume", "--no-progress")
    _full_disk_error(code, err, run)
    assert load_checkpoint(run)["step"] == 4 and not (run / "dgmr.json").exists() and _hidden(run) == []
    monkeypatch.undo()
    # space again: the resumed run only exports, and still reports the run's final loss
    code, out, err = cli("distill", "--out", run, "--resume", "--no-progress", "--json")
    assert code == 0, err
    summary = json.loads(out)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert summary["final_loss"] == rows[-1]["loss"] and summary["first_loss"] == rows[1]["loss"]
    assert json.loads((run / "dgmr.json").read_text())["distill"]["final_loss"] == rows[-1]["loss"]


def test_write_json_on_a_full_disk(tmp_path, monkeypatch):
    """What ``eval --save`` and every config writer use."""
    path = tmp_path / "knn.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".knn.json.tmp-{dead.pid}").write_text("{\"partial")  # a killed writer's temp file
    write_json(path, {"top1": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["knn.json"]
    real = pathlib.Path.write_text

    def full(self, *a, **kw):
        real(self, "{\"to")
        raise _enospc(self)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(artifact.DgmrError, match=r"cannot write .*knn.json: No space left on device \(.* free there\)"):
        write_json(path, {"top1": 0.9})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"top1": 0.5} and [p.name for p in tmp_path.iterdir()] == ["knn.json"]


def test_streaming_prune_on_a_full_disk_leaves_nothing(tmp_path, cli, monkeypatch):
    """The tensor-by-tensor writer of ``prune --weights``: the disk fills after a few tensors."""
    from safetensors.torch import save_file

    from dgmr.io.writers import FileWriter

    from dgmr.models.sources import build_model, parse_spec

    from helpers import TINY_VIT_KWARGS, TINY_VIT_SPEC

    src = parse_spec(TINY_VIT_SPEC, TINY_VIT_KWARGS)
    save_file({k: v.contiguous() for k, v in build_model(src, pretrained=False).state_dict().items()},
              str(tmp_path / "w.safetensors"))
    add, count = FileWriter.add, []

    def add_until_full(self, name, t):
        count.append(name)
        if len(count) == 5:
            raise _enospc(self.path)
        add(self, name, t)

    monkeypatch.setattr(FileWriter, "add", add_until_full)
    out = tmp_path / "out"
    code, _, err = cli("prune", TINY_VIT_SPEC, "--model-kwargs", json.dumps(TINY_VIT_KWARGS), "--mlp-ratio", "1",
                       "--weights", tmp_path / "w.safetensors", "--out", out)
    _full_disk_error(code, err, out)
    assert len(count) == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_a_full_disk_under_the_feature_cache_costs_the_cache_not_the_evaluation(tmp_path, monkeypatch):
    import dgmr.evaluate.features as features

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise _enospc(filename)

    monkeypatch.setattr(features, "save_file", full)
    cache = features.FeatureCache(tmp_path / "cache")
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(3, 4), torch.arange(3)

    with pytest.warns(UserWarning, match="No space left on device.*going on without the feature cache"):
        feats, labels = cache.features({"model": "m"}, compute)
    assert torch.equal(feats, torch.ones(3, 4)) and torch.equal(labels, torch.arange(3))
    assert cache.root is None and list((tmp_path / "cache").iterdir()) == []  # no partial entry left
    cache.features({"model": "m"}, compute)  # no second write attempt, no second warning
    assert len(calls) == 2


def test_python_api_refuses_a_non_finite_mlp_ratio():
    import dgmr
    from tiny_models import GenericNet

    for bad in (float("inf"), float("nan")):
        with pytest.raises(dgmr.DgmrError, match="mlp ratio must be > 0 and finite"):
            dgmr.prune(GenericNet(), mlp_ratio=bad, progress=False)


def test_lock_file_on_a_full_disk_and_file_systems_without_flock(tmp_path, monkeypatch):
    import fcntl
    import os

    from dgmr.core.errors import DgmrError
    from dgmr.io.output import output_lock

    def full(fd, *a):
        raise _enospc("lock")

    with monkeypatch.context() as m:  # the disk is full already when the lock records its pid
        m.setattr(os, "pwrite", full)
        with pytest.raises(DgmrError, match=r"cannot write the lock file .*No space left on device.* free there"):
            with output_lock(tmp_path / "out"):
                pass
    assert list(tmp_path.iterdir()) == []  # no lock file left

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # Lustre without -o flock, some NFS mounts
    with pytest.warns(UserWarning, match="going on without a lock"):
        with output_lock(tmp_path / "out") as lock:
            assert lock.exists()
    assert list(tmp_path.iterdir()) == []
