"""Stopping a run at a step boundary on a signal, with a checkpoint: Ctrl-C, SIGTERM, SIGUSR1.

SIGINT is Ctrl-C; SIGTERM is how schedulers and torchrun end a process; SIGUSR1 is the warning SLURM sends
ahead of the time limit with ``--signal=USR1@120`` (docs/multinode.md, Pre-emption). The first of them asks the
training loop to stop at the next step boundary, where every rank agrees on it (``Trainer``).

While that stop is pending, every other stop signal joins it, whatever its kind and source: a terminal's Ctrl-C
reaches the workers directly and again through ``timeout`` and torchrun, and torchrun follows with SIGTERM as it
shuts down; SLURM signals every process of a step. Only the same signal again after ``GRACE_S`` (the user
repeating it) stops at once, as the signal would have without these handlers, with one line naming the last
checkpoint written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
GRACE_S = 2.0
"""The same signal again within this many seconds of the first is a copy of it; later, the user repeating it."""


@dataclass
class StopRequest:
    """The first stop signal this process received (``signum`` 0: none yet)."""

    signum: int = 0
    received_at: float = 0.0


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def stop_at_step_boundary(announce: Callable[[str], None], last_checkpoint: Callable[[], str]) -> Iterator[StopRequest]:
    """Handle ``STOP_SIGNALS`` on the main thread for the duration, restoring the previous handlers after.

    The first signal sets the yielded ``StopRequest`` and is announced with ``announce``; any other signal joins
    it. The same signal ``GRACE_S`` or more after the first announces that the run stops at once, naming
    ``last_checkpoint()``, restores the previous handlers and delivers itself again (Ctrl-C raises
    ``KeyboardInterrupt``, SIGTERM and SIGUSR1 end the process). Off the main thread nothing is installed and the
    request stays empty.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous: dict[int, signal.Handlers | Callable[[int, FrameType | None], object] | int | None] = {}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def handler(signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if not request.signum:
            request.signum, request.received_at = signum, now
            said = "\nCtrl-C: stopping after this step to write a checkpoint (press again to stop at once)"
            if signum != signal.SIGINT:
                said = f"{signal_name(signum)}: stopping after this step to write a checkpoint (again to stop at once)"
            announce(said)
            return
        if signum != request.signum or now - request.received_at < GRACE_S:
            return
        name = "Ctrl-C" if signum == signal.SIGINT else signal_name(signum)
        announce(f"\n{name} again: stopping at once, without a checkpoint of this step; {last_checkpoint()}")
        restore()
        os.kill(os.getpid(), signum)

    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield request
    finally:
        restore()


def leave_stop_signals_to_the_main_process(worker_id: int = 0) -> None:
    """``worker_init_fn`` of DataLoader workers, which the signals reach too (a terminal, torchrun and SLURM signal
    whole process groups or every process of a job): the main process stops them after its checkpoint.

    Ctrl-C and SIGUSR1 are ignored. SIGTERM ends the worker only when its parent sends it (the DataLoader's and
    multiprocessing's shutdown): torch's own handler ends it whoever sends it, and the main process would then
    fail on its next batch instead of writing the checkpoint.
    """
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from_parent, name="sigterm-from-parent", daemon=True).start()


def _exit_on_sigterm_from_parent() -> None:
    parent = os.getppid()
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        continue
    os._exit(0)
