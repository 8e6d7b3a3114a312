"""What every command-line entry point shares: one line per user error, and one exit-status convention.

Exit status of ``python -m sface_dist.train`` and of every tool in ``tools/``:

* 0: done;
* 1: stopped by an error in the user's input or environment (a config key, a file, a checkpoint, a full disk, a
  peer that died), said in one line ``error: <file or key>: <problem>`` on standard error (``SFACE_DEBUG=1``
  shows the traceback instead);
* 2: the command line itself is wrong (argparse's usage message);
* 130: Ctrl-C before the command could stop at a safe point (``interrupted``); what it writes is written whole
  or not at all, so the same command again continues or redoes it;
* 128 + N: a training run stopped by signal N at a step boundary, its checkpoint written (143 for SIGTERM, 138
  for SIGUSR1, 130 for Ctrl-C).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from sface_dist.parallel.agreement import PeerError
from sface_dist.parallel.launch import LaunchError

FAILED = 1
"""Exit status of a command stopped by a user error."""
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, FloatingPointError, LaunchError)
"""What a user can cause and fix: reported in one line, never as a traceback."""


def describe_error(error: BaseException) -> str:
    """One line for a user error; an ``OSError`` names its file and reason without errno noise."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror.lower()}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def report_error(error: BaseException) -> None:
    """``error: <one line>`` on standard error (the traceback too under ``SFACE_DEBUG``)."""
    if os.environ.get("SFACE_DEBUG"):
        import traceback

        traceback.print_exception(error)
    print(f"error: {describe_error(error)}", file=sys.stderr, flush=True)


def run_cli(
    main: Callable[[], int], also: tuple[type[BaseException], ...] = (), interrupted: str = "interrupted"
) -> int:
    """``main()``'s exit status, with the module docstring's convention applied to what it raises: the
    ``USER_ERRORS`` and ``also`` (a tool's own, such as a failed child process) in one line, Ctrl-C as
    ``interrupted``. A ``PeerError`` (another rank failed and said why) ends this rank with status 1 and no line
    of its own."""
    try:
        return main()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr, flush=True)
        return INTERRUPTED
    except PeerError:
        return FAILED
    except (*USER_ERRORS, *also) as error:
        if os.environ.get("SFACE_DEBUG"):
            raise
        report_error(error)
        return FAILED
