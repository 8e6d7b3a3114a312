"""One run per output folder: a lock that names its holder, and no mixing with another run's checkpoints.

Rank 0 claims ``train.output`` before anything is written to it: it creates the folder,
takes an exclusive ``flock`` on ``OUTPUT/.lock`` (released by the kernel when the process
dies, so a killed run never leaves a stale lock) and writes its host and pid there for the
next run to name. A run that does not resume refuses a folder that already holds
checkpoints unless ``train.overwrite`` moves them aside. Every rank learns rank 0's
decision, so a refusal stops all ranks with one line.

The folder keeps the run's own record: ``config.yaml``, the config it started with, and
``history.jsonl``, one line per start or resume (time, step, world size, and the config keys
changed since the checkpoint it resumed from).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sface_dist.checkpoint import RUN_CHECKPOINTS, holds_checkpoints
from sface_dist.checkpoint_manager import Resumed
from sface_dist.config import Config, save_config
from sface_dist.distributed import PeerError, broadcast_message

LOCK_FILE = ".lock"
BEST = "best"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"
TENSORBOARD = "tensorboard"


class RunDirectoryError(ValueError):
    """``train.output`` cannot be used by this run, named with the reason."""


class RunLock:
    """An exclusive lock on a run folder, held for the life of the run."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _reason(error: OSError) -> str:
    return os.strerror(error.errno).lower() if error.errno else str(error)


def _lock(output: Path) -> RunLock:
    path = output / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise RunDirectoryError(f"train.output {output}: cannot write the run folder: {_reason(error)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirectoryError(
            f"train.output {output} is in use by another run ({holder}, lock {path}): "
            "wait for it to end or choose another train.output"
        ) from None
    holder = f"host {socket.gethostname()} pid {os.getpid()}".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder, 0)
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
        save_config(cfg, output / CONFIG_FILE)
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
    with open(output / HISTORY_FILE, "a") as history:
        history.write(json.dumps(entry) + "\n")
        history.flush()
        os.fsync(history.fileno())
