"""Bounded reading of regular files: the one reader behind config-like files and image files.

Only regular files are opened: a FIFO or a device named where a file is expected would block
``open`` forever or read without end. The file is opened non-blocking and checked with
``fstat`` before a byte is read (no window between a check and the open); a file larger than
the limit is refused from its size, and no more than ``limit + 1`` bytes are ever read (the
size ``stat`` reports may lie, as for /proc files).

:func:`read_small_file`, :func:`read_text_file` and :func:`read_json_file` are the readers of
config-like files (at most :data:`MAX_CONFIG_BYTES`); :func:`dgmr.io.images.open_image`
words the same refusals for images.
"""
from __future__ import annotations

import json
import os
import stat
from typing import Any

from ..core.errors import DgmrError

MAX_CONFIG_BYTES = 16 * 2**20  # far above any real config (a CLIP's HF config is a few kB)


class RefusedFile(Exception):
    """Why :func:`read_regular_file` read nothing: ``kind`` is ``open``, ``irregular``,
    ``size`` or ``read``; ``detail`` the OS's reason, or the size found."""

    def __init__(self, kind: str, detail: str | int = "") -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def read_regular_file(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; else :class:`RefusedFile`."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting for a writer
    except OSError as e:
        raise RefusedFile("open", e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile("irregular")
        if limit is not None and st.st_size > limit:
            raise RefusedFile("size", st.st_size)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as e:
        raise RefusedFile("read", e.strerror or str(e)) from None
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:
        raise RefusedFile("size", len(data))
    return data


def read_small_file(path: str | os.PathLike, what: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a config-like file: a regular file of at most ``limit`` bytes."""
    try:
        return read_regular_file(path, limit)
    except RefusedFile as e:
        message = {"open": f"cannot read {what} {path}: {e.detail}", "read": f"cannot read {what} {path}: {e.detail}",
                   "irregular": f"{what} {path} is not a regular file",
                   "size": f"{what} {path} is larger than {limit // 2**20} MiB: not a config file"}[e.kind]
        raise DgmrError(message) from None


def read_text_file(path: str | os.PathLike, what: str, limit: int = MAX_CONFIG_BYTES) -> str:
    try:
        return read_small_file(path, what, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DgmrError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    try:
        return json.loads(read_text_file(path, what))
    except ValueError as e:
        raise DgmrError(f"{what} {path} is not valid JSON: {e}") from None
