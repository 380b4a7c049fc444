"""Output safety: every command that writes puts these around its output (no overlap with an
input, one writer, a replace that always leaves a complete output, durable files of one mode,
one line for a storage error, what a killed writer left put back or removed).

* :func:`refuse_overlap` fails (a :class:`DgmrError`, before anything is deleted or written)
  when an output path is, contains, or lies inside one of the command's input paths: a
  ``--overwrite`` onto the image folder or the student directory would delete it.
* :func:`output_lock` holds an advisory ``fcntl.flock`` on ``<parent>/.<name>.lock``, next to
  the output (never inside it: a distill ``--overwrite`` and :func:`atomic_dir`
  replace the directory itself). The file holds the holder's pid and run token, for the error
  a second writer gets; it is removed on release. A lock file left by a killed process holds
  no lock (the kernel drops ``flock`` with the process) and is reused. Re-entrant within a process.
* :func:`output_target`: what an output directory must be, checked before any work (a path
  the system can create, not a mount point; a symbolic link is followed).
* :func:`atomic_path` (a file) and :func:`atomic_dir` (a directory) write under a temporary
  name (:func:`temp_name`), give every file :func:`file_mode` and flush it to disk, rename it
  into place (a directory is swapped in one step: :func:`replace_dir`) and flush the
  directory; :func:`remove_stale_temps` removes what a killed writer left, and puts back a
  previous output a killed replace left aside.

Paths are compared after resolving symlinks, ``..`` and relative parts (``os.path.realpath``).
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..core.errors import DgmrError, first_line
# re-exported: writers import the mode and the flushes from here, with the atomic writes
from .durable import exchange, file_mode, fsync_enabled, seal_file, seal_tree, sync_dir  # noqa: F401

try:
    import fcntl
except ImportError:  # not POSIX: no advisory lock (the overlap check still runs)
    fcntl = None  # type: ignore[assignment]

Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]
_HELD: dict[str, int] = {}  # lock file -> nesting depth, for this process
_FLOCKED: set[str] = set()  # the lock files of _HELD this process holds a real flock on


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
    """``<parent>/.<name>.lock`` of the resolved output (refused when its path is too long)."""
    p = Path(_real(out))
    if not p.name:
        raise DgmrError(f"cannot write to {out}")
    check_path_length(p)
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
        fd, flocked = _acquire(path, out)
    except BaseException:
        _remove_dirs(made)
        raise
    _HELD[key] = 1
    if flocked:
        _FLOCKED.add(key)
    try:
        yield path
    finally:
        del _HELD[key]
        _FLOCKED.discard(key)
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a waiter that opened it re-checks the inode
        os.close(fd)
        _remove_dirs(made)


def _acquire(path: Path, out: str | os.PathLike) -> tuple[int, bool]:
    """(the lock file's descriptor, whether it holds a flock)."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask's mode, as every file dgmr writes
        except OSError as e:
            raise DgmrError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # no flock on this file system (Lustre, some NFS)
                warnings.warn(f"cannot lock {path} ({e.strerror or e}): going on without a lock; do not run "
                              f"two dgmr commands on {out} at once")
                return fd, False
            holder = (os.pread(fd, 64, 0).decode(errors="replace").split() or ["unknown"])[0]
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
                os.pwrite(fd, f"{os.getpid()} {run_token()}\n".encode(), 0)
            except OSError as e:  # a full disk fails here first, before any output
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise storage_error(path, e, "the lock file") from None
            return fd, True
        os.close(fd)
    raise DgmrError(f"could not take the lock file {path} (it keeps being replaced)")


def _make_parents(d: Path) -> list[Path]:
    made = []
    while not os.path.lexists(d) and d != d.parent:  # lexists: never raises (a permission error, say, shows at mkdir)
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
# what an output path must be


def _limits(d: str) -> tuple[int, int]:
    """(PATH_MAX, NAME_MAX) of the file system holding ``d`` (or its nearest existing parent)."""
    while d and not os.path.isdir(d) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    try:
        return os.pathconf(d or "/", "PC_PATH_MAX"), os.pathconf(d or "/", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 4096, 255


# what dgmr adds to an output's name for its own files next to it: ".NAME.old-PID-TOKEN-N.SUFFIX" and ".NAME.lock"
_TEMP_ROOM = 40


def check_path_length(path: str | os.PathLike) -> None:
    """Refuse (one line, before any work) a path the system cannot create: longer than
    PATH_MAX, or a component longer than NAME_MAX; the last component leaves room for the
    temporary and lock names dgmr makes beside it."""
    full = os.fsencode(os.path.abspath(os.path.expanduser(os.fspath(path))))
    path_max, name_max = _limits(os.fsdecode(os.path.dirname(full)))
    if len(full) >= path_max - _TEMP_ROOM:
        raise DgmrError(f"the output path is {len(full):,} bytes long: this file system takes at most {path_max:,} "
                        f"(PATH_MAX, less {_TEMP_ROOM} for dgmr's temporary names); choose a shorter path "
                        f"({os.fsdecode(full[:60])}...)")
    parts = full.split(b"/")
    for i, part in enumerate(parts):
        room = _TEMP_ROOM if i == len(parts) - 1 else 0
        if len(part) > name_max - room:
            raise DgmrError(f"the output path has a name of {len(part)} bytes ({os.fsdecode(part[:40])}...): this file "
                            f"system takes at most {name_max}" + (f" (NAME_MAX, less {room} for dgmr's temporary "
                                                                  "names beside it)" if room else " (NAME_MAX)"))


def output_target(out: str | os.PathLike) -> Path:
    """The directory a command writes for ``out``, checked before any work.

    A symbolic link is followed: dgmr writes the link's target (a dangling link's target is
    created) and the link itself stays. A mount point is refused: the output is replaced by a
    rename, which a mount point does not allow."""
    check_path_length(out)
    real = Path(_real(out))
    if os.path.ismount(real):
        raise DgmrError(f"{out} is a mount point: dgmr writes an output directory by renaming a complete one into "
                        f"place, which cannot be done to a mount point; write to a directory inside it "
                        f"(e.g. {Path(out) / 'model'})")
    return real


# ---------------------------------------------------------------------------------------
# storage errors, file mode, durability

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


# ---------------------------------------------------------------------------------------
# temporary names, and what a killed writer left

_TOKEN: tuple[int, str] = (0, "")
_COUNTER = itertools.count()


def run_token() -> str:
    """A random token of this process (a forked child gets its own), in every temporary name
    it makes and in the lock files it holds: a leftover of a process that had the same pid (a
    container's pid 1 after a restart, a reused pid) is then told from this process's own."""
    global _TOKEN
    if _TOKEN[0] != os.getpid():
        _TOKEN = (os.getpid(), secrets.token_hex(4))
    return _TOKEN[1]


def temp_name(path: str | os.PathLike, tag: str = "tmp", suffix: bool = True) -> Path:
    """``<dir>/.<name>.<tag>-<pid>-<token>-<n>[<suffix>]``: hidden (skipped by --data listings),
    recognisable by :func:`remove_stale_temps`, unique within the process; ``suffix`` keeps the
    name's extension last (matplotlib picks the format from it)."""
    p = Path(path)
    end = p.suffix if suffix else ""
    return p.with_name(f".{p.name}.{tag}-{os.getpid()}-{run_token()}-{next(_COUNTER)}{end}")


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


def _started_after(pid: int, mtime: float) -> bool:
    """Whether process ``pid`` started after ``mtime`` (Linux /proc; False where unknown): then it
    cannot have written a file last changed at ``mtime``, whatever its pid."""
    try:
        after = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(after[19])  # field 22, starttime, in clock ticks after boot
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        started = btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return mtime < started - 2  # btime is whole seconds


# .<name>.<tag>-<pid>[-<token>[-<n>][.<suffix>]]: temp_name's scheme (and the older names without
# token); distill's export directory .export-<pid> and its lock ..export-<pid>.lock
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old|export)-(?P<pid>\d+)"
                    r"(?:-(?P<token>[0-9a-f]+)(?:-\d+(?:\.[^.]+)?)?)?$"
                    r"|^\.\.?export-(?P<pid2>\d+)(?:\.lock)?$")


def _is_stale(p: Path, pid: int, token: str | None, locked: bool) -> bool:
    if pid == os.getpid():
        return token != run_token()  # this pid, another token: a killed predecessor with the same pid
    if not pid_alive(pid):
        return True
    if locked and token is not None:  # under the output's lock no other writer of it runs (an older dgmr's names have no token)
        return True
    try:
        return _started_after(pid, p.lstat().st_mtime)  # the pid was reused
    except OSError:
        return False


def _holds_lock(path: Path) -> bool:
    p = Path(_real(path))
    return str(p.parent / f".{p.name}.lock") in _FLOCKED


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove what a dgmr process that no longer runs (killed mid-write) left in ``directory``:
    only names of this module's scheme, only when their writer is gone: its pid is dead, or is
    this process's with another token, or was reused by a process that started after the file
    was written, or the name carries a token and the caller holds the lock of ``directory/name``
    or of ``directory`` (every writer of an output holds its lock). ``name`` limits it to one output's. The previous
    output a killed replace left (``.NAME.old-*``, while NAME is missing) is put back, never
    removed. Call it under the output's lock. Returns what was removed."""
    d = Path(directory)
    try:
        entries = list(d.iterdir())
    except OSError:
        return []
    locked = _holds_lock(d) or (name is not None and _holds_lock(d / name))
    stale: list[tuple[Path, re.Match]] = []
    for p in entries:
        m = _STALE.match(p.name)
        if not m or (name is not None and m.group("name") != name):
            continue
        if _is_stale(p, int(m.group("pid") or m.group("pid2")), m.group("token"), locked):
            stale.append((p, m))
    _recover_previous(d, [(p, m.group("name")) for p, m in stale if m.group("tag") == "old"])
    removed = []
    for p, m in stale:
        if m.group("tag") == "old" and not os.path.lexists(d / m.group("name")):
            continue  # the only copy left (the recovery failed): never removed
        if os.path.lexists(p):
            _unlink(p)
            removed.append(p)
    return removed


def _recover_previous(d: Path, olds: list[tuple[Path, str]]) -> None:
    """A replace killed between its two renames (the fallback of :func:`replace_dir`) left the
    previous output at ``.NAME.old-*`` and no NAME: put the newest back."""
    for p, name in sorted(olds, key=lambda x: _mtime(x[0]), reverse=True):
        target = d / name
        if os.path.lexists(target):
            continue
        try:
            os.rename(p, target)
            sync_dir(d)
        except OSError as e:
            raise DgmrError(f"{target} is missing and an interrupted replace left its previous content at {p}, "
                            f"which cannot be put back ({e.strerror or e}): move it back by hand") from None
        warnings.warn(f"{target} was missing after an interrupted replace: put its previous content back from {p.name}")


def _mtime(p: Path) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return 0.0


def _unlink(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


def discard(path: str | os.PathLike) -> None:
    """Remove a file, link or folder without leaving half of it at its name: it is renamed to
    a temporary name first, so a kill during the removal leaves only that name, which
    :func:`remove_stale_temps` removes later. The rename's OSError is raised."""
    gone = temp_name(path, suffix=False)
    os.replace(path, gone)
    _unlink(gone)


# ---------------------------------------------------------------------------------------
# atomic files and directories


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "", *, own_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; the block writes it, then it gets
    :func:`file_mode`, is flushed to disk and replaces ``path`` (a symbolic link's target),
    and the directory is flushed. On any failure (a full disk, a signal, Ctrl-C) the
    temporary file goes and ``path`` keeps its previous content; a write error becomes one
    :class:`DgmrError` naming ``path`` and the free space. ``own_dir``: the name yielded is
    inside a temporary directory of its own, for writers that make their own temporary
    files beside their target (safetensors' ``.tmpXXXXXX``), which then go with it."""
    real = Path(_real(path))
    check_path_length(real)
    remove_stale_temps(real.parent, real.name)  # a killed writer's partial file would keep a full disk full
    tmp = temp_name(real)
    work = tmp / real.name if own_dir else tmp
    try:
        if own_dir:
            tmp.mkdir()
        yield work
        seal_file(work)
        os.replace(work, real)
        if own_dir:
            shutil.rmtree(tmp, ignore_errors=True)  # the entry is in place: what is left here is no output
        sync_dir(real.parent)
    except WRITE_ERRORS as e:
        _unlink(tmp)
        raise storage_error(path, e, what) from None
    except BaseException:
        _unlink(tmp)
        raise


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
    overlaps one of ``inputs`` ((label, path) pairs) or cannot be written (:func:`output_target`),
    take ``out``'s lock, put back what a killed replace left, check it is empty (or
    ``overwrite``). Held for the block, so the work before :func:`atomic_dir` (opening and
    pruning a model) runs with ``out`` already claimed."""
    refuse_overlap(out, inputs, "output directory")
    real = output_target(out)
    with output_lock(out):
        remove_stale_temps(real.parent, real.name)
        check_output_dir(real, overwrite)
        yield


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` (a symbolic link's target) only if
    the block succeeds (:func:`replace_dir`), every file in it given :func:`file_mode` and
    flushed to disk first. Holds ``out``'s lock (:func:`output_lock`; a no-op when the command
    already does) from before the emptiness check until ``out`` is in place."""
    real = output_target(out)
    with output_lock(out):
        remove_stale_temps(real.parent, real.name)  # first: a killed replace's previous output comes back
        check_output_dir(real, overwrite)
        tmp = temp_name(real, suffix=False)
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            yield tmp
            seal_tree(tmp)
        except WRITE_ERRORS as e:  # a full disk, an I/O error: the previous output stays as it was
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, DgmrError):
                raise
            raise storage_error(out, e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, real, shown=out)


def replace_dir(tmp: Path, out: Path, shown: str | os.PathLike | None = None) -> None:
    """Put the complete directory ``tmp`` at ``out`` so that ``out`` always holds a complete
    output: a rename where ``out`` does not exist; else ``out`` and ``tmp`` are swapped in
    one step (:func:`exchange`) and the previous output, now at ``tmp``, is removed. Where
    the swap is not available, the fallback is two renames (``out`` to ``.OUT.old-*``,
    ``tmp`` to ``out``): a kill between them leaves no ``out`` for that instant, and the next
    write of ``out`` puts the previous output back (:func:`remove_stale_temps`). Any error is
    one :class:`DgmrError`, and ``out`` then holds its previous content."""
    shown = shown if shown is not None else out
    previous, first = None, not os.path.lexists(out)
    try:
        if first:
            os.rename(tmp, out)
        elif exchange(tmp, out):
            previous = tmp
        else:
            previous = _two_renames(tmp, out, shown)
    except OSError as e:
        _unlink(tmp)
        if first:
            raise storage_error(shown, e) from None
        raise DgmrError(f"cannot replace {shown}: {e.strerror or e}; it keeps its previous content "
                        f"({free_space(out)} there)") from None
    try:
        sync_dir(out.parent)
    except OSError as e:
        raise DgmrError(f"wrote {shown} but could not flush its directory to disk: {e.strerror or e}") from None
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def _two_renames(tmp: Path, out: Path, shown: str | os.PathLike) -> Path:
    old = temp_name(out, "old", suffix=False)
    os.rename(out, old)  # fails: nothing changed
    try:
        os.rename(tmp, out)
    except OSError as e:
        try:
            os.rename(old, out)
        except OSError:
            _unlink(tmp)
            raise DgmrError(f"cannot replace {shown}: {e.strerror or e}; its previous content is at {old} (the next "
                            f"dgmr command writing {shown} puts it back)") from None
        raise
    return old


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically and durably (:func:`atomic_path`); a failed write is one DgmrError naming ``path`` and the free space."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_text(path: str | os.PathLike, text: str) -> None:
    """A text file (reports, model cards) through :func:`atomic_path`, as UTF-8."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
