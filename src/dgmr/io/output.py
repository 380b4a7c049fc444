"""Output safety: every command that writes puts these around its output (no overlap with an
input, one writer, atomic replacement, one line for a storage error, stale temporaries removed).

* :func:`refuse_overlap` fails (a :class:`DgmrError`, before anything is deleted or written)
  when an output path is, contains, or lies inside one of the command's input paths: a
  ``--overwrite`` onto the image folder or the student directory would delete it.
* :func:`output_lock` holds an advisory ``fcntl.flock`` on ``<parent>/.<name>.lock``, next to
  the output (never inside it: a distill ``--overwrite`` and :func:`atomic_dir`
  replace the directory itself). The file holds the holder's pid, for the error a second
  writer gets; it is removed on release. A lock file left by a killed process holds no lock
  (the kernel drops ``flock`` with the process) and is reused. Re-entrant within a process.

Paths are compared after resolving symlinks, ``..`` and relative parts (``os.path.realpath``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..core.errors import DgmrError, first_line

try:
    import fcntl
except ImportError:  # not POSIX: no advisory lock (the overlap check still runs)
    fcntl = None  # type: ignore[assignment]

Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]
_HELD: dict[str, int] = {}  # lock file -> nesting depth, for this process


def _real(p: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(p)))


def _inside(child: str, parent: str) -> bool:
    return child != parent and child.startswith(parent.rstrip(os.sep) + os.sep)


def refuse_overlap(out: str | os.PathLike, inputs: Inputs, what: str = "output") -> None:
    """Raise if ``out`` equals, contains or lies inside any input; ``inputs`` are (label, path)
    pairs, ``None`` paths skipped (a hub spec, an in-memory model)."""
    o = _real(out)
    for label, path in inputs:
        if path is None:
            continue
        i = _real(path)
        relation = "is" if o == i else "contains" if _inside(i, o) else "lies inside" if _inside(o, i) else None
        if relation:
            raise DgmrError(f"refusing to write the {what} {out}: it {relation} the {label} {path} "
                            "(an output must not overlap an input)")


def lock_path(out: str | os.PathLike) -> Path:
    """``<parent>/.<name>.lock`` of the resolved output."""
    p = Path(_real(out))
    if not p.name:
        raise DgmrError(f"cannot write to {out}")
    return p.parent / f".{p.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path | None]:
    """Hold the advisory lock of ``out`` for the block (released on any exit, including
    exceptions and KeyboardInterrupt); a second process gets a :class:`DgmrError` naming the
    holder's pid. Parent directories made for the lock file go again if still empty."""
    path = lock_path(out)
    key = str(path)
    if fcntl is None or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    made = _make_parents(path.parent)
    try:
        fd = _acquire(path, out)
    except BaseException:
        _remove_dirs(made)
        raise
    _HELD[key] = 1
    try:
        yield path
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a waiter that opened it re-checks the inode
        os.close(fd)
        _remove_dirs(made)


def _acquire(path: Path, out: str | os.PathLike) -> int:
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DgmrError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # no flock on this file system (Lustre, some NFS)
                warnings.warn(f"cannot lock {path} ({e.strerror or e}): going on without a lock; do not run "
                              f"two dgmr commands on {out} at once")
                return fd
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DgmrError(f"{out} is in use by another dgmr process (pid {holder}; lock file {path}): "
                            "wait for it to finish, or stop it") from None
        # the holder may have removed the file between our open and flock: only a lock on
        # the file still at `path` counts
        try:
            st, fst = os.stat(path), os.fstat(fd)
            current = (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as e:  # a full disk fails here first, before any output
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise storage_error(path, e, "the lock file") from None
            return fd
        os.close(fd)
    raise DgmrError(f"could not take the lock file {path} (it keeps being replaced)")


def _make_parents(d: Path) -> list[Path]:
    made = []
    while not d.exists():
        made.append(d)
        d = d.parent
    for p in reversed(made):
        try:
            p.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            raise DgmrError(f"cannot create {p}: {e.strerror or e}") from None
    return made


def _remove_dirs(made: list[Path]) -> None:
    for p in made:  # deepest first; one that now holds something stays
        with contextlib.suppress(OSError):
            p.rmdir()


# ---------------------------------------------------------------------------------------
# storage errors and temporary files

# what a failed write of a serialiser looks like: torch.save reports a full disk as a
# RuntimeError ("unexpected pos"), safetensors as a SafetensorError (not an OSError)
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError)
try:
    from safetensors import SafetensorError

    WRITE_ERRORS += (SafetensorError,)
except ImportError:  # pragma: no cover - safetensors is a dependency
    pass


def free_space(path: str | os.PathLike) -> str:
    """Free space on the file system of ``path`` (or its nearest existing parent), for messages."""
    p = Path(_real(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit} free"
    return f"{free} bytes free"


def storage_error(path: str | os.PathLike, e: BaseException, what: str = "") -> DgmrError:
    """One line for a failed write: the path, the reason, the free space left."""
    reason = getattr(e, "strerror", None) or first_line(e)
    return DgmrError(f"cannot write {what + ' ' if what else ''}{path}: {reason} ({free_space(path)} there)")


def temp_name(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """``<dir>/.<name>.<tag>-<pid>``: hidden (skipped by --data listings) and owned by this
    process, so :func:`remove_stale_temps` can tell a dead writer's leftovers from a live one's."""
    p = Path(path)
    return p.with_name(f".{p.name}.{tag}-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "") -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; the block writes it, then it replaces
    ``path``. On any failure (a full disk, a signal, Ctrl-C) the temporary file goes and
    ``path`` keeps its previous content; a write error becomes one :class:`DgmrError`
    naming ``path`` and the free space."""
    tmp = temp_name(path)
    remove_stale_temps(Path(path).parent, Path(path).name)  # a killed writer's partial file would keep a full disk full
    try:
        yield tmp
        os.replace(tmp, path)
    except WRITE_ERRORS as e:
        _unlink(tmp)
        raise storage_error(path, e, what) from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return True  # not a pid we wrote: never treat as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# .<name>.<tag>-<pid>[-<hex>], the names temp_name, atomic_dir and the distill export use
# (and the lock file of distill's export directory, ..export-<pid>.lock, which names its pid too)
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old|export)-(?P<pid>\d+)(?:-[0-9a-f]+)?$"
                    r"|^\.\.?export-(?P<pid2>\d+)(?:\.lock)?$")


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files and directories in ``directory`` that a dgmr process which
    no longer runs left (killed mid-write): only names this module's scheme makes, only when
    their pid is dead; ``name`` limits it to those of one output. Call it under the output's
    lock. Returns what was removed."""
    removed = []
    d = Path(directory)
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STALE.match(p.name)
        if not m or (name is not None and m.group("name") != name):
            continue
        pid = int(m.group("pid") or m.group("pid2"))
        if pid != os.getpid() and not pid_alive(pid):
            _unlink(p)
            removed.append(p)
    return removed


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` holds files and ``overwrite`` is off."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DgmrError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DgmrError(f"output directory {out} is not empty (pass --overwrite to replace it)")
    return out


@contextlib.contextmanager
def claimed_output_dir(out: str | os.PathLike, inputs: Inputs, overwrite: bool) -> Iterator[None]:
    """What a command writing a model directory does before any work: refuse an ``out`` that
    overlaps one of ``inputs`` ((label, path) pairs), take ``out``'s lock, check it is empty
    (or ``overwrite``). Held for the block, so the work before :func:`atomic_dir` (opening and
    pruning a model) runs with ``out`` already claimed."""
    refuse_overlap(out, inputs, "output directory")
    with output_lock(out):
        check_output_dir(out, overwrite)
        yield


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds. Holds
    ``out``'s lock (:func:`output_lock`; a no-op when the command already does)
    from before the emptiness check until ``out`` is in place."""
    with output_lock(out):
        out = check_output_dir(out, overwrite)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(out.parent, e) from None
        remove_stale_temps(out.parent, out.name)  # what a killed writer of this output left
        # .<name>.tmp-<pid>-<hex>: the pid tells remove_stale_temps whether its writer still runs
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            yield tmp
        except WRITE_ERRORS as e:  # a full disk, an I/O error: the previous output stays as it was
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, DgmrError):
                raise
            raise storage_error(out, e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        share_modes(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def file_mode() -> int:
    """The mode a plain ``open(..., "w")`` gives a new file: 0666 less the umask."""
    try:  # the umask without changing it (Linux 4.7+)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def share_modes(root: Path) -> None:
    """Give every file under ``root`` the mode of a file ``open`` creates (0644 under the usual
    umask): some writers (safetensors) create theirs 0600, so the weights of a model directory
    were unreadable to others beside readable configs."""
    mode = file_mode()
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, name), mode)


def write_json(path: Path, obj: Any) -> None:
    """Atomically (temp + rename); a failed write is one DgmrError naming ``path`` and the free space."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
