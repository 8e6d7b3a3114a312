"""Appending keyed records to a ``.rec`` file and their offsets to its ``.idx``."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from sface_dist.data.recordio.framing import frame


class RecordIOWriter:
    """Appends keyed records to a ``.rec`` file and their offsets to its ``.idx`` file."""

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii")

    def write(self, key: int, record: bytes) -> None:
        """Write ``record`` under ``key`` (keys must be unique: readers reject duplicates)."""
        offset = self._rec.tell()
        self._rec.write(frame(record))
        self._idx.write(f"{key}\t{offset}\n")

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
