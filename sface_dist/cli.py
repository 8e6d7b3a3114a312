"""What every command-line entry point shares: one line per user error, and the exit status after Ctrl-C."""

from __future__ import annotations

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def describe_error(error: BaseException) -> str:
    """One line for a user error; an ``OSError`` names its file and reason without errno noise."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror.lower()}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
