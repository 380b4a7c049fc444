"""A replace that always leaves a model (docs/failures.md, "Replacing an output"): kills and
I/O errors injected at the syscall (strace), what a killed writer left, and the output paths
refused before any work (mount points, paths over PATH_MAX; symbolic links are followed)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import dgmr
from dgmr.core.errors import DgmrError
from dgmr.io.output import atomic_dir, exchange, remove_stale_temps, run_token, write_json
from dgmr.models.artifact import RECORD, read_config

from helpers import CHILD_ENV as ENV, TINY_VIT_ARGV, strace_ok, tiny_run_inputs, tree_bytes, under_strace

pytestmark = pytest.mark.usefixtures("one_thread")

# a writer of a directory output as the commands write theirs (atomic_dir), its error line and
# exit code as the CLI's: argv = OUT CONTENT [--overwrite]. dgmr's package root (torch, timm ...)
# is not imported: dgmr.io and dgmr.core alone start in a tenth of a second
WRITER = textwrap.dedent("""
    import sys, types
    from pathlib import Path
    root = types.ModuleType("dgmr")
    root.__path__ = [%r]
    sys.modules["dgmr"] = root
    from dgmr.core.errors import DgmrError
    from dgmr.io.output import atomic_dir
    try:
        with atomic_dir(Path(sys.argv[1]), overwrite="--overwrite" in sys.argv) as tmp:
            (tmp / "weights.bin").write_bytes(sys.argv[2].encode() * 1000)
            (tmp / "config.json").write_text(sys.argv[2])
    except DgmrError as e:
        print(f"dgmr: error: {e}", file=sys.stderr)
        sys.exit(2)
""") % str(Path(dgmr.__file__).parent)


needs_strace = pytest.mark.skipif(not strace_ok(), reason="needs strace with ptrace permitted (syscall fault injection)")


def _write(out: Path, content: str, *extra: str, inject: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = ["-c", WRITER, str(out), content, *extra]
    if inject:
        return under_strace(argv, *inject)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=ENV)


def _model(out: Path) -> str | None:
    """The content of the complete output at ``out`` (None: no complete output there)."""
    if not (out / "config.json").is_file():
        return None
    content = (out / "config.json").read_text()
    assert (out / "weights.bin").read_bytes() == content.encode() * 1000  # complete, never half of one
    return content


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dgmr: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------------------------------------
def test_the_replace_swaps_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    swapped = exchange(a, b)  # renameat2(RENAME_EXCHANGE); False where the system has none, and nothing changed
    assert ((b / "x").read_text(), (a / "x").read_text()) == (("new", "old") if swapped else ("old", "new"))
    assert swapped or not sys.platform.startswith("linux")
    assert _write(tmp_path / "out", "one").returncode == 0
    assert _write(tmp_path / "out", "two", "--overwrite").returncode == 0
    assert _model(tmp_path / "out") == "two" and _names(tmp_path) == ["a", "b", "out"]


@needs_strace
def test_a_kill_at_the_swap_leaves_the_previous_model_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "out"
    assert _write(out, "old").returncode == 0
    killed = _write(out, "new", "--overwrite", inject=("renameat2:signal=KILL",))
    assert killed.returncode == -9, killed.stderr
    assert _model(out) == "old"  # a complete model at every instant
    left = [n for n in _names(tmp_path) if n.startswith(".out.tmp-")]
    assert len(left) == 1 and _model(tmp_path / left[0]) == "new"
    assert _write(out, "third", "--overwrite").returncode == 0
    assert _model(out) == "third" and _names(tmp_path) == ["out"]  # the dead writer's copy and lock file went


@needs_strace
def test_a_kill_between_the_fallback_renames_is_recovered_never_deleted(tmp_path):
    """Where RENAME_EXCHANGE fails (EINVAL: a file system without it), the replace is two
    renames; a kill between them leaves no OUT, the previous model at .OUT.old-*. The next
    writer puts it back before anything else (and refuses to overwrite it without --overwrite)."""
    out = tmp_path / "out"
    assert _write(out, "old").returncode == 0
    killed = _write(out, "new", "--overwrite", inject=("renameat2:error=EINVAL", "rename:signal=KILL:when=2"))
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    olds = [n for n in _names(tmp_path) if n.startswith(".out.old-")]
    assert len(olds) == 1 and _model(tmp_path / olds[0]) == "old"
    with pytest.warns(UserWarning, match="was missing after an interrupted replace: put its previous content back"):
        assert remove_stale_temps(tmp_path, "out") and _model(out) == "old"  # put back, not removed
    assert [n for n in _names(tmp_path) if n != ".out.lock"] == ["out"]
    # the same again, recovered by the next command itself
    killed = _write(out, "new", "--overwrite", inject=("renameat2:error=EINVAL", "rename:signal=KILL:when=2"))
    assert killed.returncode == -9 and not out.exists()
    again = _write(out, "other")  # without --overwrite: the recovered model is not replaced
    assert again.returncode == 2, again.stderr
    assert again.stderr.strip().splitlines()[-1] == f"dgmr: error: output directory {out} is not empty (pass " \
                                                    "--overwrite to replace it)", again.stderr
    assert f"{out} was missing after an interrupted replace: put its previous content back" in again.stderr
    assert _model(out) == "old" and _names(tmp_path) == ["out"]


@needs_strace
def test_errors_during_the_replace_are_one_line_and_keep_the_previous_model(tmp_path):
    out = tmp_path / "out"
    assert _write(out, "old").returncode == 0
    _one_line(_write(out, "new", "--overwrite", inject=("renameat2:error=EIO",)),
              f"cannot replace {out}: Input/output error; it keeps its previous content")
    assert _model(out) == "old" and _names(tmp_path) == ["out"]
    # the fallback: the second rename fails, the first is undone
    _one_line(_write(out, "new", "--overwrite", inject=("renameat2:error=EINVAL", "rename:error=EIO:when=2")),
              "Input/output error; it keeps its previous content")
    assert _model(out) == "old" and _names(tmp_path) == ["out"]
    # ... and where undoing it fails too, the error says where the previous model is, and the next writer puts it back
    failed = _write(out, "new", "--overwrite", inject=("renameat2:error=EINVAL", "rename:error=EIO:when=2+"))
    _one_line(failed, "its previous content is at", ".out.old-")
    assert not out.exists() and _model(tmp_path / failed.stderr.split(" is at ")[1].split(" (")[0]) == "old"
    assert _write(out, "new", "--overwrite").returncode == 0
    assert _model(out) == "new" and _names(tmp_path) == ["out"]


@needs_strace
def test_prune_overwrite_with_an_io_error_at_the_swap(tmp_path, cli):
    """The command line: a killed replace's previous model is put back (one warning line), the
    I/O error at the swap is one error line, exit 2, the previous model intact and loadable."""
    out = tmp_path / "pruned"
    assert cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", out)[0] == 0
    before = tree_bytes(out)
    old = tmp_path / f".pruned.old-{_dead_pid()}-0badc0de-1"
    out.rename(old)  # what a kill between the fallback's two renames leaves
    proc = under_strace(["-m", "dgmr.cli", "prune", *TINY_VIT_ARGV, "--mlp-ratio", "2", "--out", str(out),
                          "--overwrite", "--json"], "renameat2:error=EIO")
    assert proc.returncode == 2, proc.stderr
    warning, error = proc.stderr.splitlines()
    assert warning == f"dgmr: warning: {out} was missing after an interrupted replace: put its previous content " \
                      f"back from {old.name}", proc.stderr
    assert error.startswith(f"dgmr: error: cannot replace {out}: Input/output error; it keeps its previous "
                            "content (") and error.endswith(" free there)"), proc.stderr
    assert tree_bytes(out) == before and _names(tmp_path) == ["pruned"]
    assert dgmr.load(out) is not None


# ---------------------------------------------------------------------------------------------
# temporary names a killed writer left


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_pid_1_or_a_reused_pid_are_removed(tmp_path):
    """A container's entrypoint is pid 1 again after a restart, and pids are reused: a temporary
    name's pid being alive does not make its writer alive. The run token (in the name and the
    lock file) and the process's start time tell them apart."""
    old = time.time() - 10 * 365 * 86400  # written before any process now running started
    stale = [tmp_path / ".r.json.tmp-1-0badc0de-0.json",  # pid 1, long before it started
             tmp_path / f".r.json.tmp-{os.getpid()}-0badc0de-3.json",  # this pid, another run's token
             tmp_path / f".r.json.tmp-{_dead_pid()}"]  # an older dgmr's name, its pid dead
    for p in stale:
        p.write_text("{\"partial")
    os.utime(stale[0], (old, old))
    live = [tmp_path / ".r.json.tmp-1-0badc0de-1.json",  # pid 1 may have written this one (it is recent)
            tmp_path / f".r.json.tmp-{os.getpid()}-{run_token()}-9.json",  # this very process's
            tmp_path / f".other.json.tmp-{_dead_pid()}-0badc0de-0.json"]  # another output's
    for p in live:
        p.write_text("{\"partial")
    write_json(tmp_path / "r.json", {"top1": 1.0})
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)
    # under the output's lock, no other writer of it can be running: every tokened name of it is stale
    (tmp_path / "out").mkdir()
    (tmp_path / ".out.tmp-1-0badc0de-0").mkdir()
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "x").write_text("x")
    assert not (tmp_path / ".out.tmp-1-0badc0de-0").exists()


# ---------------------------------------------------------------------------------------------
# output paths


def test_an_output_path_longer_than_path_max_is_one_line(tmp_path, cli):
    deep = tmp_path / "/".join(["d" * 200] * 22)  # over 4096 bytes
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", deep)
    assert code == 2 and err.startswith("dgmr: error: the output path is ") and "PATH_MAX" in err, err
    assert err.count("\n") == 1 and _names(tmp_path) == []
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", tmp_path / ("n" * 250))
    assert code == 2 and "NAME_MAX" in err and err.count("\n") == 1, err  # no room for .NAME.tmp-... beside it
    with pytest.raises(DgmrError, match="PATH_MAX"):
        write_json(deep / "r.json", {})
    code, _, err = cli("eval", "speed", *TINY_VIT_ARGV, "--repeats", "1", "--warmup", "0", "--batch-size", "1",
                       "--save", deep / "speed.json")
    assert code == 2 and "PATH_MAX" in err and err.count("\n") == 1, err
    assert _names(tmp_path) == []


def test_symlinked_out_writes_the_target_and_keeps_the_link(tmp_path, cli):
    """A symbolic link as --out is followed (documented): the target is written or replaced,
    the link stays; a dangling link's target is created."""
    target, link = tmp_path / "models" / "v1", tmp_path / "latest"
    link.symlink_to(target)  # dangling: models/v1 does not exist yet
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target) and (target / RECORD).is_file()
    assert read_config(link)["widths"]["blocks.0.mlp"] == 192
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "2", "--out", link, "--overwrite")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)  # not replaced by a directory
    assert read_config(target)["widths"]["blocks.0.mlp"] == 384
    assert _names(tmp_path) == ["latest", "models"] and _names(tmp_path / "models") == ["v1"]  # no .old link
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", link)
    assert code == 2 and "is not empty" in err  # the target is what is checked


def test_out_that_is_a_mount_point_is_refused_before_any_work(tmp_path, cli, mounted):
    """prune, import and report replace their output directory as a whole: a mount point is
    refused. A distill run directory is written inside, so a volume can hold a run."""
    volume = mounted(tmp_path / "volume", "64m")  # an empty mount, as a container volume
    for extra in ((), ("--overwrite",)):
        code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", volume, *extra)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{volume} is a mount point" in err and f"{volume / 'model'}" in err, err
    assert _names(volume) == [] and _names(tmp_path) == ["volume"]
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", volume / "model")  # inside it: fine
    assert code == 0, err
    tiny = tiny_run_inputs(tmp_path / "in", 2)
    runs = mounted(tmp_path / "runs", "64m")
    for extra in ((), ("--overwrite",)):  # a new run, then one replacing it (its files go, the mount stays)
        code, _, err = cli("distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data",
                           tiny["images"], "--out", runs, "--steps", "1", "--batch-size", "3", "--workers", "0",
                           "--device", "cpu", "--no-progress", "--no-tensorboard", *extra)
        assert code == 0, err
        assert os.path.ismount(runs) and (runs / "checkpoint.pt").is_file() and (runs / RECORD).is_file()
