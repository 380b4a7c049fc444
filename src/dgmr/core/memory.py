"""Memory: the peak resident set of this process (sampled by a background thread), giving freed
pages back, and one error line for running out of it."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import re
import threading
from typing import Any, Iterator

import psutil

from .errors import OutOfMemory, first_line


class PeakRss:
    """Context manager: ``peak`` is the largest RSS (bytes) seen while inside, sampled every
    ``every`` seconds and once more on exit."""

    def __init__(self, every: float = 0.02) -> None:
        self.proc = psutil.Process()
        self.every = every
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> "PeakRss":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def release_freed() -> None:
    """Hand the C allocator's free pages back to the OS (glibc ``malloc_trim``; nothing on
    other C libraries).

    Why: after a large block is freed glibc raises its mmap threshold (up to 32 MiB), so a
    loop that allocates and frees same-sized tensors moves them onto the heap, and up to
    twice that threshold of freed memory stays resident per arena. A streaming prune holds
    one MLP at a time; without this its resident set drifts 40-80 MB above that working set,
    by chance, from run to run."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError (numpy, scipy, Python), torch's CUDA OutOfMemoryError, or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()
                                            or "Cannot allocate memory" in text)


def byte_size(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


_TRIED = re.compile(r"tried to allocate ([0-9.]+) ?(bytes|[KMGT]iB)", re.IGNORECASE)


@contextlib.contextmanager
def out_of_memory(what: str, needed: int | None = None, *, layer: str | None = None) -> Iterator[None]:
    """Running out of memory in the block is one :class:`OutOfMemory` line instead of a
    traceback: "LAYER: out of memory WHAT: it needs about NEEDED (an allocation of N failed)".
    ``needed`` is the caller's estimate in bytes; an :class:`OutOfMemory` from deeper down gets
    ``layer`` in front."""
    try:
        yield
    except OutOfMemory as e:
        if layer is None or str(e).startswith(f"{layer}: "):
            raise
        raise OutOfMemory(f"{layer}: {e}") from None
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        tried = _TRIED.search(str(e))
        failed = f"{tried.group(1)} {tried.group(2)}" if tried else None
        if failed and failed.endswith("bytes"):
            failed = byte_size(float(tried.group(1)))
        need = f"it needs about {byte_size(needed)}" if needed else "not enough memory"
        raise OutOfMemory(f"{layer + ': ' if layer else ''}out of memory {what}: {need}"
                          + (f" (an allocation of {failed} failed)" if failed else f" ({first_line(e)[:120]})")
                          + "; free memory, or run it where there is more") from None
