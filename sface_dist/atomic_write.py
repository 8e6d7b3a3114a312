"""Write a file or a folder so that a reader finds the old version or the complete new one, never a part.

New content goes to a temporary sibling (``.NAME.tmpPID``: the same folder, so the rename stays on one file
system, and a name per process, so processes writing the same target do not share one), which is flushed and
fsynced, renamed over the target, and the folder is fsynced so that the rename itself survives a crash. A
failure removes the temporary and leaves the target as it was. A link at the target is replaced, never
written through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """``.NAME.KINDPID`` beside ``path``: where this process stages (``tmp``) or retires (``old``) ``path``."""
    return path.with_name(f".{path.name}.{kind}{os.getpid()}")


def fsync_directory(path: Path) -> None:
    """Flush ``path``'s entries (names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` when the block ends without an exception, for streaming writers
    (``torch.save``, ``np.save``, ``pickle.dump``).

    The temporary is created afresh, never through a link (a leftover of a process that had this pid is
    removed first), with the mode ``open`` would give it.
    """
    path = Path(path)
    temporary = temporary_sibling(path)
    temporary.unlink(missing_ok=True)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(temporary, flags, 0o666), "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` (``atomic_open``)."""
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` (``atomic_open``)."""
    atomic_write_bytes(path, text.encode(encoding))


def publish_file(temporary: Path, path: Path) -> None:
    """Fsync the finished file ``temporary``, rename it over ``path`` and fsync the folder: for writers that take
    a path rather than a file (an exporter, a file copy)."""
    _fsync_file(temporary)
    os.replace(temporary, path)
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_files(folder: Path, names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """Temporary paths (``temporary_sibling``) for the files ``names`` of ``folder``, which is created: each one
    the block wrote is fsynced and renamed into place when it ends without an exception, one after the other.

    A name whose temporary the block did not create keeps the file it had. Every temporary is removed in the end.
    """
    temporaries = {name: temporary_sibling(folder / name) for name in names}
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield temporaries
        written = {name: temporary for name, temporary in temporaries.items() if temporary.exists()}
        for name, temporary in written.items():
            _fsync_file(temporary)
            os.replace(temporary, folder / name)
        if written:
            fsync_directory(folder)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)


def replace_folder(staging: Path, target: Path, retired: Path) -> None:
    """Rename the finished folder ``staging`` to ``target`` and fsync their parent.

    An existing ``target`` is first renamed to ``retired`` and deleted only afterwards, so ``target`` never names a
    folder that is half deleted; a ``retired`` left by an earlier crash is deleted first.
    """
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    fsync_directory(target.parent)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """An empty staging folder beside ``path`` that replaces it (``replace_folder``) when the block ends without an
    exception, and is deleted when it raises.

    The staging folder's entries are fsynced; a file written into it survives a crash if its writer fsyncs it
    (``atomic_open`` does), while a folder of files that can be written again (extracted images) is spared the cost.
    """
    staging = temporary_sibling(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        fsync_directory(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, path, temporary_sibling(path, "old"))
