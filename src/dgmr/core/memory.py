"""Peak resident memory of this process, sampled by a background thread."""
from __future__ import annotations

import ctypes
import functools
import threading
from typing import Any

import psutil


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
