"""Guards every command that writes puts around its output: no overlap with an input, one writer.

* :func:`refuse_overlap` fails (a :class:`DgmrError`, before anything is deleted or written)
  when an output path is, contains, or lies inside one of the command's input paths: a
  ``--overwrite`` onto the image folder or the student directory would delete it.
* :func:`output_lock` holds an advisory ``fcntl.flock`` on ``<parent>/.<name>.lock``, next to
  the output (never inside it: a distill ``--overwrite`` and :func:`~dgmr.models.artifact.atomic_dir`
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
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DgmrError, first_line

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


def model_path(model: Any) -> str | None:
    """The file-system path a model argument names: a dgmr directory, ``hf:DIR`` or
    ``open_clip:local-dir:DIR`` when DIR exists, an open_clip TAG that is a file; ``None`` for
    hub specs (``timm:NAME``), modules and :class:`~dgmr.models.sources.Source` objects."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    s = os.fspath(model)
    library, sep, rest = s.partition(":")
    library = library.lower().replace("-", "_")
    if not sep or library not in ("timm", "open_clip", "openclip", "hf"):
        return s  # a directory dgmr wrote (or a path that will not open: harmless to compare)
    if library != "hf":
        rest = rest[len("local-dir:"):] if rest.startswith("local-dir:") else rest.partition(":")[2]
    return rest if rest and os.path.exists(rest) else None


def checkpoint_paths(weights: str | os.PathLike) -> list[str]:
    """A checkpoint file or directory, and the shards a ``*.index.json`` names (they may
    live elsewhere than the index)."""
    paths = [os.fspath(weights)]
    index = Path(weights)
    if index.is_dir():
        index = index / "model.safetensors.index.json"
    if index.name.endswith(".index.json") and index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
            paths += [str(index.parent / str(f)) for f in sorted(shards)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # the reader reports a bad index; here only the paths matter
    return paths


def data_paths(data: Any) -> list[str]:
    """The paths ``--data`` reads: a folder, a list file, WebDataset shards, or the path
    items of an in-memory list (images and tensors are not paths)."""
    from .distill.data import _expand_shards, _is_shard_spec

    if isinstance(data, (list, tuple)):
        return sorted({os.fspath(x) for x in data if isinstance(x, (str, os.PathLike))})
    if not isinstance(data, (str, os.PathLike)):
        return []
    s = os.fspath(data)
    paths = [s]
    if not os.path.exists(s) and _is_shard_spec(s):
        try:
            paths = _expand_shards(s)
        except Exception:  # noqa: BLE001 - resolve_data reports a bad pattern
            pass
    return [p for p in paths if "://" not in p and not p.startswith("pipe:")]  # URLs and pipes are not local paths


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
