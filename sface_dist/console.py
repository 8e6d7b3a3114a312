"""How library code speaks to the user: whole lines on standard output, flushed at once so that the lines of
several ranks interleave whole under torchrun.

One convention for the package: a module reports through ``say`` (progress, decisions) and ``warn`` (something
the user should act on), passing its rank where several processes would say the same; only rank 0 speaks then.
Errors are exceptions, turned into one line by ``cli.run_cli``. Nothing here uses ``logging``: its handlers
belong to the application that embeds the library, and the project's lines are part of its interface.
"""

from __future__ import annotations


def say(message: str, rank: int = 0) -> None:
    """Print ``message`` on rank 0 (every process that passes no rank)."""
    if rank == 0:
        print(message, flush=True)


def warn(message: str, rank: int = 0) -> None:
    """``say`` a line starting ``warning:``."""
    say(f"warning: {message}", rank)
