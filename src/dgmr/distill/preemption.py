"""Stopping a run on request: while training, SIGTERM (what SLURM and Kubernetes send before a
preemption) and SIGUSR1 (SLURM's ``--signal``) only set a flag (:class:`StopSignals`), read
after each step, so the step in progress finishes and the recipe writes a checkpoint before it
stops with :class:`~dgmr.core.errors.Preempted` (CLI exit code 75). Outside the training loop
the handlers are the caller's (the CLI's turns SIGTERM into :class:`~dgmr.core.errors.Terminated`).
"""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator

from ..core import dist as D
from ..core.signals import STOP_SIGNALS, handling


class StopSignals:
    """The stop signal this process received (:attr:`received`), while :meth:`catching`."""

    def __init__(self) -> None:
        self.received: int | None = None

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """The stop signals set :attr:`received` for the block; the previous handlers come back
        after. Main thread only (Python's rule for signal handlers): elsewhere nothing changes."""
        self.received = None

        def flag(signum: int, frame: Any) -> None:
            self.received = signum

        with handling(STOP_SIGNALS, flag):
            yield

    def requested(self, info: D.DistInfo) -> bool:
        """Whether any rank got a stop signal (a collective, so that all ranks stop after the same step)."""
        return D.any_rank(self.received is not None, info)

    def name(self) -> str:
        """The signal's name, for the message a stopped run ends with."""
        return signal.Signals(self.received).name if self.received else "a signal on another rank"
