"""Durable files of one mode, and swapping two paths in one step: the primitives under
:mod:`dgmr.io.output`'s atomic writes (which re-exports them; call those).

* :func:`file_mode`: the one mode of every file dgmr writes, 0666 less the umask;
* :func:`seal_file`, :func:`seal_tree`, :func:`sync_dir`: that mode and ``fsync`` before a
  rename, the directory's ``fsync`` after it (``DGMR_FSYNC=0`` skips the fsync calls);
* :func:`exchange`: Linux ``renameat2(RENAME_EXCHANGE)`` through ctypes, False where the C
  library, the kernel or the file system has no such swap.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
import threading
from typing import Any

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    try:  # Linux shows it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of every file dgmr writes: 0666 less the umask (0644 under the usual 022).
    Writers differ (safetensors makes 0600 files), so each file gets it before its rename."""
    return 0o666 & ~_umask()


def fsync_enabled() -> bool:
    """``DGMR_FSYNC=0`` skips the fsync calls (docs/failures.md: what it costs, what it risks)."""
    return os.environ.get("DGMR_FSYNC", "1").strip().lower() not in ("0", "false", "no", "off")


def seal_file(path: str | os.PathLike) -> None:
    """Give a written file :func:`file_mode` and flush it to disk (before it is renamed into place:
    after a power loss a renamed file is then never empty)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        try:
            os.fchmod(fd, file_mode())
        except OSError:  # a file system without modes (some FUSE and SMB mounts): the content is what counts
            pass
        if fsync_enabled():
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(d: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk; a file system that cannot
    (EINVAL: some network and FUSE file systems) is left as it is."""
    if not fsync_enabled() or not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def seal_tree(root: str | os.PathLike) -> None:
    """:func:`seal_file` every file under ``root`` (symbolic links left as they are), then flush
    every directory, deepest first."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                seal_file(p)
        sync_dir(dirpath)


# renameat2(2) flag: swap two paths atomically (Linux 3.15+, glibc 2.28+; most local file systems)
RENAME_EXCHANGE = 2
_NO_EXCHANGE = (errno.ENOSYS, errno.EINVAL, errno.EPERM, getattr(errno, "EOPNOTSUPP", errno.EINVAL))


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap ``a`` and ``b`` in one step (``renameat2(RENAME_EXCHANGE)``); False where the system
    or the file system cannot (nothing changed then); another failure is its OSError."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(os.fspath(a)), at_fdcwd, os.fsencode(os.fspath(b)), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))
