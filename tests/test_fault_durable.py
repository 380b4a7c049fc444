"""Every file dgmr writes goes through the atomic path (docs/failures.md, "Durable writes"):
one mode under the umask, fsync before the rename and of the directory after it, a real full
disk (tmpfs) costs nothing written before, no writer's own temporary file outlives a kill; the
demo's outputs and its signals."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import textwrap
from pathlib import Path

import pytest
import torch

import dgmr
from dgmr.cli import main
from dgmr.core.errors import DgmrError
from dgmr.evaluate.features import FeatureCache
from dgmr.io.output import atomic_path, file_mode, write_json
from dgmr.models.artifact import INDICES, RECORD
from dgmr.models.card import CARD

from helpers import TINY_VIT_ARGV, TINY_VIT_KWARGS, TINY_VIT_SPEC, strace_ok, tiny_run_inputs, tree_bytes, under_strace

pytestmark = pytest.mark.usefixtures("one_thread")
KW = json.dumps(TINY_VIT_KWARGS)


@contextlib.contextmanager
def umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _modes(*roots: Path) -> dict[str, int]:
    """Mode of every regular file under ``roots`` (their path relative to the root's parent)."""
    out = {}
    for root in roots:
        for p in [root] if root.is_file() else root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root.parent))] = stat.S_IMODE(p.stat().st_mode)
    return out


def test_every_file_gets_one_mode_under_the_umask(tmp_path, cli):
    """Weights used to be 0600 (safetensors writes through a private temporary file) beside
    0644 configs: now 0666 less the umask for every file of every writer."""
    tiny = tiny_run_inputs(tmp_path / "in", 2)
    assert file_mode() == 0o644  # the usual umask 022
    with umask(0o027):
        assert file_mode() == 0o640
        assert cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", tmp_path / "pruned")[0] == 0
        code, _, err = cli("prune", TINY_VIT_SPEC, "--model-kwargs", KW, "--mlp-ratio", "1", "--weights",
                           tiny["teacher"] / "model.safetensors", "--out", tmp_path / "streamed")
        assert code == 0, err
        code, _, err = cli("import", TINY_VIT_SPEC, tmp_path / "pruned" / "model.safetensors", "--model-kwargs", KW,
                           "--out", tmp_path / "imported")
        assert code == 0, err
        code, _, err = cli("eval", "knn", tiny["student"], "--train", tiny["images"], "--val", tiny["images"],
                           "--cache-dir", tmp_path / "cache", "--save", tmp_path / "knn.json", "--json")
        assert code == 0, err
        code, _, err = cli("distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data",
                           tiny["images"], "--out", tmp_path / "run", "--steps", "1", "--batch-size", "3", "--workers",
                           "0", "--device", "cpu", "--no-progress", "--no-tensorboard", "--save-every", "1")
        assert code == 0, err
        code, _, err = cli("report", tmp_path / "run", tmp_path / "knn.json", "--out", tmp_path / "report")
        assert code == 0, err
    modes = _modes(*(tmp_path / n for n in ("pruned", "streamed", "imported", "cache", "knn.json", "run", "report")))
    for name in ("pruned/model.safetensors", f"pruned/{INDICES}", f"pruned/{RECORD}", "pruned/config.json",
                 f"pruned/{CARD}", "streamed/model.safetensors", f"streamed/{RECORD}", "imported/model.safetensors",
                 f"imported/{RECORD}", "knn.json", "run/checkpoint.pt", "run/model.safetensors", "run/run_config.json",
                 "run/metrics.jsonl", "report/report.md"):
        assert name in modes, name
    assert any(n.startswith("cache/") for n in modes) and any(n.endswith(".png") for n in modes)
    assert {n: m for n, m in modes.items() if m != 0o640} == {}


def _fsyncs(monkeypatch) -> list[str]:
    """The paths os.fsync is called on, in order (what the descriptor names)."""
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")
def test_files_are_flushed_before_the_rename_and_the_directory_after(tmp_path, cli, monkeypatch):
    calls = _fsyncs(monkeypatch)
    out = tmp_path / "pruned"
    assert cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", out)[0] == 0
    names = sorted(p.name for p in out.iterdir())
    tmp = Path(calls[0]).parent  # the temporary directory the files were written in
    assert tmp.name.startswith(".pruned.tmp-")
    flushed = [Path(c).name for c in calls if Path(c).parent == tmp]
    assert set(names) <= set(flushed)  # every file, in the temporary directory: before the rename
    last = {c: i for i, c in enumerate(calls)}  # the last flush of each path
    assert last[str(tmp)] > max(last[str(tmp / n)] for n in names)  # then its directory
    assert calls[-1] == str(tmp_path)  # and after the rename, the directory it was renamed into
    calls.clear()
    write_json(tmp_path / "r.json", {"a": 1})
    assert [Path(c).name for c in calls][-1] == tmp_path.name and calls[0].startswith(str(tmp_path / ".r.json.tmp-"))
    calls.clear()
    monkeypatch.setenv("DGMR_FSYNC", "0")  # the setting that turns the flushes off (docs/failures.md: the cost)
    write_json(tmp_path / "r.json", {"a": 2})
    assert calls == [] and json.loads((tmp_path / "r.json").read_text()) == {"a": 2}


# ---------------------------------------------------------------------------------------------
# a real full disk


def _fill(d: Path) -> None:
    """Fill the file system of ``d`` to the last byte."""
    with open(d / "filler", "wb", buffering=0) as f:
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while f.write(b"\0" * size):
                    pass


def test_a_real_full_disk_keeps_every_previous_output(tmp_path, cli, mounted):
    disk = mounted(tmp_path / "disk", "6m")
    out = disk / "pruned"
    assert cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", out)[0] == 0  # 3 MiB
    before = tree_bytes(out)
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "4", "--out", out, "--overwrite", "--json")  # 4.5 MiB more
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"dgmr: error: cannot write {out}: ") and "No space left on device" in err, err
    assert err.endswith(" free there)\n"), err
    assert tree_bytes(out) == before and sorted(os.listdir(disk)) == ["pruned"]

    # a plot over a previous one (the demo's recovery.png went to 0 bytes): the previous stays whole
    from dgmr.report.plots import pyplot

    plt = pyplot()
    png = disk / "recovery.png"
    fig = plt.figure(figsize=(2, 2))
    with atomic_path(png) as t:  # the temporary name keeps .png: matplotlib picks the format from it
        fig.savefig(t)
    first = png.read_bytes()
    _fill(disk)
    fig.gca().plot(range(1000), [i * i for i in range(1000)])
    with pytest.raises(DgmrError, match=r"cannot write .*recovery.png: No space left on device"):
        with atomic_path(png) as t:
            fig.savefig(t, dpi=300)
    plt.close(fig)
    assert png.read_bytes() == first and sorted(os.listdir(disk)) == ["filler", "pruned", "recovery.png"]

    # the feature cache: the evaluation goes on without it, nothing partial is left
    cache = FeatureCache(disk / "cache")
    with pytest.warns(UserWarning, match="No space left on device.*going on without the feature cache"):
        feats, _ = cache.features({"model": "m", "n": "64"}, lambda: (torch.ones(64, 4096), torch.zeros(64).long()))
    assert feats.shape == (64, 4096) and cache.root is None
    assert [p.name for p in (disk / "cache").iterdir()] == []


@pytest.mark.skipif(not strace_ok(), reason="needs strace with ptrace permitted (syscall fault injection)")
def test_a_killed_cache_writer_leaves_nothing_the_next_one_keeps(tmp_path):
    """safetensors writes through a .tmpXXXXXX of its own beside its target and renames it: a
    kill there used to leave it in the cache for good. The cache writes inside a temporary
    directory of its own, which the next writer removes (its writer is dead)."""
    child = textwrap.dedent(f"""
        import sys, types
        import numpy as np
        from pathlib import Path
        root = types.ModuleType("dgmr")
        root.__path__ = [{str(Path(dgmr.__file__).parent)!r}]
        sys.modules["dgmr"] = root
        from safetensors.numpy import save_file
        from dgmr.io.output import atomic_path
        with atomic_path(Path(sys.argv[1]), own_dir=True) as tmp:
            save_file({{"features": np.ones((4, 4), np.float32)}}, str(tmp))
    """)
    entry = tmp_path / "cache" / "k.safetensors"
    entry.parent.mkdir()
    killed = under_strace(["-c", child, str(entry)], "renameat:signal=KILL")  # safetensors' own rename
    assert killed.returncode == -9, killed.stderr
    (left,) = entry.parent.iterdir()
    assert left.name.startswith(".k.safetensors.tmp-") and [p.name[:4] for p in left.iterdir()] == [".tmp"]
    cache = FeatureCache(entry.parent)
    cache.put("k", torch.ones(2, 3), torch.zeros(2).long(), {"model": "m"})
    assert [p.name for p in entry.parent.iterdir()] == ["k.safetensors"]


# ---------------------------------------------------------------------------------------------
# the demo


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """``dgmr demo`` at the smallest settings (one criterion, one student, two distillation steps)."""
    from dgmr.demo import DemoSettings

    def make(out, seed=0, quick=False):
        return DemoSettings(out=str(out), seed=seed, criteria=("l2",), ratios=(1.0,), seeds=1, teacher_epochs=1,
                            distill_steps=3, distill_batch=32, eval_every=1, knn_every=3, speed_batch=16,
                            calibrated=())

    out = tmp_path_factory.mktemp("demo") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(DemoSettings, "make", classmethod(lambda cls, *a, **kw: make(*a, **kw)))
        assert main(["demo", "--out", str(out), "--json"]) == 0
    return out, make


def test_the_demo_writes_through_the_atomic_path(tiny_demo, monkeypatch, capsys):
    from dgmr.demo import DemoSettings

    out, make = tiny_demo
    before = {n: (out / n).read_bytes() for n in ("recovery.png", "report.md", "accuracy_vs_flops.png", "results.json")}
    assert all(before.values())
    monkeypatch.setattr(DemoSettings, "make", classmethod(lambda cls, *a, **kw: make(*a, **kw)))
    import matplotlib.figure

    def full(self, fname, *a, **kw):  # half a PNG, then the disk is full
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dgmr: error: cannot write a plot {out / 'recovery.png'}: No space left on device"), err
    for n in ("recovery.png", "report.md", "accuracy_vs_flops.png"):
        assert (out / n).read_bytes() == before[n], n
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_sigterm_in_the_demo_exits_143_as_documented(tiny_demo, monkeypatch, capsys):
    """The demo distils in memory: its SIGTERM is any command's (exit 143, temporary output
    removed), never distill's 75 with advice to --resume a run that cannot resume."""
    from dgmr.demo import DemoSettings
    from dgmr.distill.recipe import DistillRecipe

    out, make = tiny_demo
    monkeypatch.setattr(DemoSettings, "make", classmethod(lambda cls, *a, **kw: make(*a, **kw)))
    step = DistillRecipe.train_step

    def train_step(self, batches):
        if self.state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batches)

    monkeypatch.setattr(DistillRecipe, "train_step", train_step)
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--json"]) == 143
    err = capsys.readouterr().err
    assert err == "dgmr: terminated by SIGTERM; temporary output removed\n", err
