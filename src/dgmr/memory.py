"""Peak resident memory of this process, sampled by a background thread."""
from __future__ import annotations

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
