"""One run per output folder: a lock that names its holder, and no mixing with another run's checkpoints.

Rank 0 claims ``train.output`` before anything is written to it: it creates the folder,
takes an exclusive POSIX record lock on ``OUTPUT/.lock`` and writes its host and pid there for
the next run to name. The lock belongs to the process: the kernel releases it when the run's
process dies, even while DataLoader workers it forked live on, so a killed run never leaves a
stale lock. ``.lock`` must be a regular file: a symbolic link or a FIFO there is refused, never
followed. A run that does not resume refuses a folder that already holds
checkpoints unless ``train.overwrite`` moves them aside. Every rank learns rank 0's
decision, so a refusal stops all ranks with one line.

The folder keeps the run's own record: ``config.yaml``, the config it started with, and
``history.jsonl``, one line per start or resume (time, step, world size, and the config keys
changed since the checkpoint it resumed from).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

from sface_dist.checkpoint import RUN_CHECKPOINTS, holds_checkpoints
from sface_dist.config import Config, save_config
from sface_dist.parallel.agreement import PeerError, broadcast_message
from sface_dist.training.checkpoint_manager import Resumed

LOCK_FILE = ".lock"
BEST = "best"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"
TENSORBOARD = "tensorboard"


class RunDirectoryError(ValueError):
    """``train.output`` cannot be used by this run, named with the reason."""


_held_by_this_process: set[Path] = set()
"""Run folders this process holds: a POSIX lock does not exclude a second claim from its own process."""


class RunLock:
    """An exclusive lock on a run folder, held for the life of the run."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd >= 0:
            _held_by_this_process.discard(self.path.resolve())
            os.close(self._fd)
            self._fd = -1


def _reason(error: OSError) -> str:
    return os.strerror(error.errno).lower() if error.errno else str(error)


def _in_use(output: Path, path: Path, holder: str) -> RunDirectoryError:
    return RunDirectoryError(
        f"train.output {output} is in use by another run ({holder}, lock {path}): "
        "wait for it to end or choose another train.output"
    )


def _open_run_file(output: Path, path: Path, flags: int, use: str) -> int:
    """``path`` opened with ``flags`` (created if missing), never through a link nor blocking on a FIFO: a run's
    own file in its folder, one line naming it otherwise (``use``: what the run does with it)."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RunDirectoryError(f"train.output {output}: {path} is a symbolic link: refused ({use}; remove "
                                    "the link)") from None
        raise RunDirectoryError(f"train.output {output}: cannot write the run folder: {path}: "
                                f"{_reason(error)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirectoryError(f"train.output {output}: {path} is not a regular file: refused (remove it)")
    return fd


def _lock(output: Path) -> RunLock:
    path = output / LOCK_FILE
    if path.resolve() in _held_by_this_process:
        raise _in_use(output, path, f"this process, pid {os.getpid()}")
    fd = _open_run_file(output, path, os.O_RDWR, "the lock is written to")
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise RunDirectoryError(f"train.output {output}: cannot lock {path}: {_reason(error)}") from None
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise _in_use(output, path, holder) from None
    holder = f"host {socket.gethostname()} pid {os.getpid()}".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder, 0)
    _held_by_this_process.add(path.resolve())
    return RunLock(path, fd)


def has_checkpoints(output: Path) -> bool:
    return holds_checkpoints(output / RUN_CHECKPOINTS)


def _move_aside(output: Path) -> Path:
    """Move the earlier run (checkpoints, best backbones, TensorBoard events, config and history) into
    ``OUTPUT/replaced-<time>/``."""
    aside = output / time.strftime("replaced-%Y%m%d-%H%M%S")
    suffix = 0
    while aside.exists():
        suffix += 1
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{suffix}")
    aside.mkdir()
    for name in (RUN_CHECKPOINTS, BEST, TENSORBOARD, CONFIG_FILE, HISTORY_FILE):
        if (output / name).exists():
            os.replace(output / name, aside / name)
    return aside


def _claim(output: Path, resume: bool, overwrite: bool) -> tuple[RunLock, str | None]:
    """Rank 0's half of ``claim_run_directory``: the lock, and a note if checkpoints were moved aside."""
    if output.exists() and not output.is_dir():
        raise RunDirectoryError(f"train.output {output}: exists and is not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirectoryError(f"train.output {output}: cannot create the run folder: {_reason(error)}") from None
    lock = _lock(output)
    try:
        if has_checkpoints(output) and (overwrite or not resume):
            if not overwrite:
                raise RunDirectoryError(
                    f"train.output {output} already holds checkpoints of an earlier run and train.resume is false: "
                    "set train.resume=true to continue it, choose another train.output, or --set "
                    "train.overwrite=true to move them aside and start over"
                )
            try:
                return lock, f"moved the earlier run's checkpoints to {_move_aside(output)}"
            except OSError as error:
                message = f"train.output {output}: cannot move checkpoints aside: {_reason(error)}"
                raise RunDirectoryError(message) from None
    except RunDirectoryError:
        lock.release()
        raise
    return lock, None


def claim_run_directory(output: Path, *, resume: bool, overwrite: bool, is_main: bool) -> tuple[RunLock | None, str]:
    """Collective: rank 0 locks ``output`` and checks it; every rank raises if rank 0 refused.

    Returns the lock (rank 0 only) and what was done to the folder (empty if nothing).
    """
    lock: RunLock | None = None
    refusal: str | None = None
    note = ""
    if is_main:
        try:
            lock, moved = _claim(output, resume, overwrite)
            note = moved or ""
        except RunDirectoryError as error:
            refusal = str(error)
    refusal = broadcast_message(refusal)
    if refusal is not None:
        if is_main:
            raise RunDirectoryError(refusal)
        raise PeerError(refusal)
    return lock, note


def record_start(output: Path, cfg: Config, step: int, world_size: int, resumed: Resumed | None) -> None:
    """Rank 0: note this start in ``OUTPUT/history.jsonl``; a run that starts from scratch also writes the config
    it starts with to ``OUTPUT/config.yaml`` (a resume leaves it as it was: its changes are in the history)."""
    if resumed is None:
        save_config(cfg, output / CONFIG_FILE)  # written beside and renamed: a link there is replaced, not followed
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "event": "start" if resumed is None else "resume",
        "step": step,
        "world_size": world_size,
    }
    if resumed is not None:
        entry |= {
            "from": resumed.path.name,
            "from_world_size": resumed.world_size,
            "changes": {change.key: [change.saved, change.current] for change in resumed.changes},
        }
    fd = _open_run_file(output, output / HISTORY_FILE, os.O_WRONLY | os.O_APPEND, "the run's history is appended to")
    with open(fd, "a") as history:
        history.write(json.dumps(entry) + "\n")
        history.flush()
        os.fsync(history.fileno())
