"""Random access to the records of a ``.rec`` file through its ``.idx``."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np

from sface_dist.data.recordio.framing import FRAME_SIZE, RecordIOError, unframe
from sface_dist.data.recordio.index import read_index


class RecordIOReader:
    """Random access to the records of a ``.rec`` file through its ``.idx``.

    The ``.rec`` file is opened on first read and reopened in a forked child, and the
    reader pickles without its file handle, so one instance can be handed to DataLoader
    workers. Keys and offsets live in (memory-mapped) numpy arrays, no Python objects per
    record; keys forming one consecutive run (the usual case) are looked up arithmetically.
    """

    def __init__(
        self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str], cache: bool | None = None
    ) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        if not self.rec_path.is_file():
            raise RecordIOError(f"{self.rec_path}: RecordIO file not found")
        if not self.idx_path.is_file():
            raise RecordIOError(
                f"{self.idx_path}: RecordIO index not found (needed next to {self.rec_path.name}; "
                f"'convert_rec.py reindex {self.rec_path}' rebuilds it)"
            )
        self._rec_size = self.rec_path.stat().st_size
        table = read_index(self.idx_path, cache)
        self._keys, self._offsets = table[:, 0], table[:, 1]
        self._check_offsets()
        self._first_key = int(self._keys[0]) if len(self._keys) else 0
        self._consecutive = _is_consecutive(self._keys)
        self._sort: np.ndarray | None = None
        self._sorted_keys: np.ndarray | None = None
        if not self._consecutive:
            self._sort = np.argsort(self._keys, kind="stable")
            self._sorted_keys = self._keys[self._sort]
            duplicates = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
            if duplicates.size:
                raise RecordIOError(f"{self.idx_path}: key {self._sorted_keys[duplicates[0]]} appears more than once")
        self._file: _PidFile | None = None

    @property
    def keys(self) -> list[int]:
        """Keys in ``.idx`` order."""
        return self._keys.tolist()

    @property
    def key_array(self) -> np.ndarray:
        """Keys in ``.idx`` order as a read-only int64 array (no per-key Python objects)."""
        view = self._keys.view()
        view.flags.writeable = False
        return view

    @property
    def offset_array(self) -> np.ndarray:
        """Record offsets in ``.idx`` order as a read-only int64 array."""
        view = self._offsets.view()
        view.flags.writeable = False
        return view

    @property
    def file_size(self) -> int:
        return self._rec_size

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: int) -> bool:
        return self._position(key) is not None

    def offset(self, key: int) -> int:
        """Byte offset of ``key``'s record in the ``.rec`` file."""
        position = self._position(key)
        if position is None:
            raise KeyError(f"{self.idx_path}: no key {key}")
        return int(self._offsets[position])

    def location(self, key: int) -> str:
        """``file: key K at offset O`` of a record, for error messages."""
        return f"{self.rec_path}: key {key} at offset {self.offset(key)}"

    def read(self, key: int) -> bytes:
        """The record stored under ``key``, with split parts joined back."""
        offset = self.offset(key)
        fd = self._fd()
        try:
            return unframe(lambda at, n: os.pread(fd, n, at), offset, self._rec_size)[0]
        except RecordIOError as error:
            raise RecordIOError(f"{self.rec_path}: key {key} at offset {offset}: {error}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.handle.close()
            self._file = None

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_file": None}

    def _fd(self) -> int:
        if self._file is None or self._file.pid != os.getpid():
            self._file = _PidFile(io.FileIO(self.rec_path, "rb"), os.getpid())
        return self._file.handle.fileno()

    def _position(self, key: int) -> int | None:
        if self._consecutive:
            position = key - self._first_key
            return position if 0 <= position < len(self._keys) else None
        assert self._sorted_keys is not None and self._sort is not None
        i = int(np.searchsorted(self._sorted_keys, key))
        if i == len(self._sorted_keys) or self._sorted_keys[i] != key:
            return None
        return int(self._sort[i])

    def _check_offsets(self) -> None:
        past_end = np.flatnonzero(self._offsets > self._rec_size - FRAME_SIZE)
        if past_end.size:
            i = past_end[0]
            raise RecordIOError(
                f"{self.idx_path}: key {self._keys[i]} has offset {self._offsets[i]} past the end of "
                f"{self.rec_path} ({self._rec_size} bytes)"
            )


class _PidFile(NamedTuple):
    handle: io.FileIO
    pid: int


def _is_consecutive(keys: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Whether ``keys`` is ``k, k+1, k+2, ...`` (checked in chunks: no N-sized temporaries)."""
    for start in range(0, len(keys), chunk):
        piece = keys[max(start - 1, 0) : start + chunk]
        if not np.all(np.diff(piece) == 1):
            return False
    return True
