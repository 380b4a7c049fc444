"""Signal handlers for the length of a block: installed in the main thread only (Python's rule),
the previous handlers put back however the block ends."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Iterator

# what SLURM and Kubernetes send before they stop a job (SIGUSR1: SLURM's --signal warning)
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


@contextlib.contextmanager
def handling(signals: Iterable[int], handler: Callable[[int, Any], None]) -> Iterator[bool]:
    """``handler`` for ``signals`` inside the block; yields whether it was installed (False off
    the main thread, where Python allows no handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    before = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield True
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM and SIGUSR1. SLURM and
    Kubernetes signal every process of the job: a worker dying of it would make the main
    process fail (distill: before its checkpoint), or its teardown print the workers' death as
    an 18-line "Exception ignored" trace. A worker still ends with the main process (the
    loader's shutdown, or its parent watchdog)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.excepthook = _quiet_handover(sys.excepthook)


def _quiet_handover(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` but for a broken connection in multiprocessing's resource sharer: the worker's
    thread that hands a batch's file descriptors to the main process. A main process stopped by
    the signal in the middle of that handshake left it a BrokenPipe/EOF traceback (its
    ``_serve`` calls ``sys.excepthook`` itself); the main process reports the signal."""
    sharer = os.path.join("multiprocessing", "resource_sharer.py")

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, (EOFError, OSError)) and tb is not None and tb.tb_frame.f_code.co_filename.endswith(sharer):
            return
        hook(kind, value, tb)

    return excepthook
