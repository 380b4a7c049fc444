"""The one exception type for user mistakes: the CLI prints its message on one line."""


class DgmrError(Exception):
    """A user-facing error (bad input, missing file, impossible request)."""
