"""The one exception type for user mistakes: the CLI prints its message on one line."""


class DgmrError(Exception):
    """A user-facing error (bad input, missing file, impossible request)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a
    one-line ``dgmr: error:`` can carry of a library's multi-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# exit codes of the command line (docs/failures.md)
EXIT_ERROR = 2  # a DgmrError: bad input, missing file, disk full ...
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: distill stopped on SIGTERM/SIGUSR1 after writing a checkpoint; --resume it
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM outside distill's training loop (128 + SIGTERM): temporary output removed


class OutOfMemory(DgmrError):
    """A step ran out of memory (:func:`dgmr.core.memory.out_of_memory`): the message names the
    layer and the memory it needs."""


class Preempted(DgmrError):
    """distill stopped on a signal after finishing its step and writing a checkpoint;
    ``signum`` is the signal (None: another rank's)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (outside distill's training loop), so that every
    ``finally`` and context manager removes its temporary output, as for Ctrl-C."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum
