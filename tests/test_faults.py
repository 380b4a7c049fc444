"""Data-loss guards (docs/failures.md): an output never overlaps an input, one writer per output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dgmr
from dgmr.distill import distill
from dgmr.core.errors import DgmrError
from dgmr.evaluate import save_result
from dgmr.report import render_report
from dgmr.io.output import lock_path, output_lock, refuse_overlap, run_token

from helpers import TINY_VIT_ARGV, TINY_VIT_KWARGS, TINY_VIT_SPEC, tiny_run_inputs

KW = json.dumps(TINY_VIT_KWARGS)
# what another process holding an output's lock does: the documented file, flock, its pid inside
HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    out = os.path.realpath(sys.argv[1])
    fd = os.open(os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("locked", flush=True)
    time.sleep(120)
""")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A random-init tiny teacher (a dgmr directory), its r=1 student, 8 images."""
    return tiny_run_inputs(tmp_path_factory.mktemp("faults"), 4)


@pytest.fixture
def holder():
    """``holder(out)``: a child process holding ``out``'s lock; yields the Popen (stopped after)."""
    procs = []

    def start(out: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("dgmr: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _distill_argv(tiny, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data", tiny["images"],
            "--out", out, "--steps", "2", "--batch-size", "4", "--workers", "0", "--log-every", "1",
            "--save-every", "1", "--device", "cpu", "--no-progress", "--no-tensorboard", *extra]


# ---------------------------------------------------------------------------------------
# overlap: refused before anything is deleted or written
def test_distill_out_is_data_or_student_refused(tiny, cli):
    before = _files(tiny["images"]), _files(tiny["student"])
    _refused(*cli(*_distill_argv(tiny, tiny["images"], "--overwrite"))[::2], "is the data", str(tiny["images"]))
    _refused(*cli(*_distill_argv(tiny, tiny["student"], "--overwrite"))[::2], "is the student")
    _refused(*cli(*_distill_argv(tiny, tiny["images"] / "a" / "run"))[::2], "lies inside the data")
    _refused(*cli(*_distill_argv(tiny, tiny["root"], "--overwrite"))[::2], "contains the teacher")
    assert (_files(tiny["images"]), _files(tiny["student"])) == before
    with pytest.raises(DgmrError, match="is the data"):  # the Python API too
        distill(str(tiny["teacher"]), str(tiny["student"]), str(tiny["images"]), tiny["images"], overwrite=True,
                     steps=1, device="cpu", progress=False)
    assert _files(tiny["images"]) == before[0]
    assert not list(tiny["root"].glob(".*.lock"))


def test_prune_import_report_eval_overlap_refused(tiny, cli, tmp_path):
    teacher, before = tiny["teacher"], _files(tiny["teacher"])
    _refused(*cli("prune", teacher, "--mlp-ratio", "1", "--out", teacher / "sub")[::2], "lies inside the model")
    # a relative path with '..' and a symlink resolve to the same directory
    link = tmp_path / "link"
    link.symlink_to(tiny["root"])
    _refused(*cli("prune", teacher, "--mlp-ratio", "1", "--out", link / "x" / ".." / "teacher", "--overwrite")[::2],
             "is the model")
    ckpt = teacher / "model.safetensors"
    stream = ("prune", TINY_VIT_SPEC, "--model-kwargs", KW, "--mlp-ratio", "1", "--weights", ckpt)
    _refused(*cli(*stream, "--out", teacher, "--overwrite")[::2], "contains the weights")
    _refused(*cli("import", TINY_VIT_SPEC, ckpt, "--model-kwargs", KW, "--out", teacher, "--overwrite")[::2],
             "contains the checkpoint")
    _refused(*cli("import", TINY_VIT_SPEC, ckpt, "--model-kwargs", KW, "--out", ckpt / "x")[::2],
             "lies inside the checkpoint")
    assert _files(teacher) == before
    res = tmp_path / "res"
    res.mkdir()
    (res / "knn.json").write_text("{}")
    _refused(*cli("report", res / "knn.json", "--out", res, "--overwrite")[::2], "contains the input")
    _refused(*cli("report", res, "--out", res / "report")[::2], "lies inside the input")
    assert _files(res) == ["knn.json"]
    imgs, images_before = tiny["images"], _files(tiny["images"])
    _refused(*cli("eval", "knn", *TINY_VIT_ARGV, "--train", imgs, "--val", imgs, "--save", imgs / "knn.json")[::2],
             "lies inside the --train")
    with pytest.raises(DgmrError, match="is the --captions"):
        save_result({}, res / "knn.json", [("--captions", res / "knn.json")])
    with pytest.raises(DgmrError, match="contains the input"):
        render_report([res / "knn.json"], tmp_path)
    assert _files(imgs) == images_before


def test_refuse_overlap_unit(tmp_path):
    refuse_overlap(tmp_path / "out", [("data", tmp_path / "data"), ("model", None)])  # siblings are fine
    refuse_overlap(tmp_path / "ab", [("data", tmp_path / "a")])  # a prefix of the name is not a parent
    with pytest.raises(DgmrError, match="contains the data"):
        refuse_overlap(tmp_path, [("data", tmp_path / "d" / "x.txt")])


# ---------------------------------------------------------------------------------------
# locks
def test_second_writer_refused_with_pid(tmp_path, cli, holder):
    out = tmp_path / "out"
    p = holder(out)
    _refused(*cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", out)[::2], f"pid {p.pid}", "in use")
    assert not out.exists()
    p.kill()
    p.wait()
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", out)  # a dead holder holds nothing
    assert code == 0, err
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", out, "--overwrite")  # released
    assert code == 0, err
    assert dgmr.load(out) is not None
    assert [q.name for q in tmp_path.iterdir()] == ["out"]  # the lock file went with the run


def test_distill_lock_resume_refused_then_released(tiny, tmp_path, cli, holder):
    run = tmp_path / "run"
    code, _, err = cli(*_distill_argv(tiny, run))
    assert code == 0, err
    assert not lock_path(run).exists()
    p = holder(run)
    _refused(*cli("distill", "--out", run, "--resume", "--steps", "3")[::2], f"pid {p.pid}")
    _refused(*cli(*_distill_argv(tiny, run, "--overwrite"))[::2], f"pid {p.pid}")
    assert (run / "checkpoint.pt").is_file() and (run / "dgmr.json").is_file()
    p.kill()
    p.wait()
    code, _, err = cli(*_distill_argv(tiny, run, "--overwrite"))
    assert code == 0, err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["run"]


def test_lock_unit(tmp_path, holder):
    out = tmp_path / "deep" / "out"
    with pytest.raises(KeyboardInterrupt):
        with output_lock(out):
            assert lock_path(out).read_text().strip() == f"{os.getpid()} {run_token()}"  # the holder's pid and run token
            with output_lock(out):  # re-entrant in one process (atomic_dir inside a command's lock)
                pass
            raise KeyboardInterrupt
    assert not (tmp_path / "deep").exists()  # lock file and the parent made for it are gone
    p = holder(tmp_path / "r.json")
    with pytest.raises(DgmrError, match=f"pid {p.pid}"):
        save_result({"top1": 1.0}, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
