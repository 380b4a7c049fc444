"""The one exception type for user mistakes: the CLI prints its message on one line."""


class DgmrError(Exception):
    """A user-facing error (bad input, missing file, impossible request)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a
    one-line ``dgmr: error:`` can carry of a library's multi-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
