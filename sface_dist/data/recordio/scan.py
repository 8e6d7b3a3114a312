"""Reading a ``.rec`` in file order without its ``.idx``: to inspect it, to step over damage, to rebuild the index."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from sface_dist.data.recordio.framing import MAGIC_BYTES, RecordIOError, unframe
from sface_dist.data.recordio.image_header import unpack
from sface_dist.data.recordio.index import write_index


class ScannedRecord(NamedTuple):
    """A record found by ``scan_records``: its byte offset, ordinal in the file and payload."""

    offset: int
    ordinal: int
    record: bytes


class SkippedBytes(NamedTuple):
    """Bytes ``[offset, resume)`` of a ``.rec`` that hold no readable record, found by ``scan_resynchronising``.

    ``error`` says what is wrong at ``offset``; ``resume`` is where the next sound record starts
    (the file size when none does).
    """

    offset: int
    resume: int
    error: str


def scan_records(rec_path: str | os.PathLike[str]) -> Iterator[ScannedRecord]:
    """Every record of a ``.rec`` file in file order, read sequentially without its index.

    Errors name the file, the record's ordinal and its byte offset; nothing after a broken
    frame can be trusted, so the scan stops there.
    """
    rec_path = Path(rec_path)
    with _mapped(rec_path) as data:
        position, ordinal = 0, 0
        while position < len(data):
            try:
                record, end = unframe(_slicer(data), position, len(data))
            except RecordIOError as error:
                raise RecordIOError(f"{rec_path}: record {ordinal} at offset {position}: {error}") from None
            yield ScannedRecord(position, ordinal, record)
            position, ordinal = end, ordinal + 1


def scan_resynchronising(rec_path: str | os.PathLike[str]) -> Iterator[ScannedRecord | SkippedBytes]:
    """Every record of a ``.rec`` in file order, stepping over damaged bytes instead of stopping there.

    After a frame that does not parse, the scan resumes at the next 4-byte-aligned magic that
    starts a sound record: one whose frames parse and which ends at the end of the file or at
    the next magic (dmlc never leaves an aligned magic inside a payload, so these are record
    starts). The search starts just after the last record read, so when that record's length
    field was damaged (it ran past the next record) it is reported instead of yielded. One
    damaged record thus costs one ``SkippedBytes``, not the rest of the file. Ordinals count
    the records yielded.
    """
    with _mapped(Path(rec_path)) as data:
        read_at, size = _slicer(data), len(data)
        pending: tuple[int, bytes] | None = None
        position, ordinal = 0, 0
        while position < size:
            try:
                record, end = unframe(read_at, position, size)
            except RecordIOError as error:
                problem = str(error)
                resume = _next_record_start(data, (pending[0] if pending else position) + 4)
                if pending is not None and resume < position:
                    problem = f"damaged length: the record would run to byte {position}, past the next record"
                    position, pending = pending[0], None
                if pending is not None:
                    yield ScannedRecord(pending[0], ordinal, pending[1])
                    pending, ordinal = None, ordinal + 1
                yield SkippedBytes(position, resume, problem)
                position = resume
                continue
            if pending is not None:
                yield ScannedRecord(pending[0], ordinal, pending[1])
                ordinal += 1
            pending, position = (position, record), end
        if pending is not None:
            yield ScannedRecord(pending[0], ordinal, pending[1])


def _next_record_start(data: mmap.mmap | bytes, start: int) -> int:
    """The first 4-byte-aligned offset at or after ``start`` where a sound record starts (``len(data)`` if none)."""
    size = len(data)
    start += -start % 4
    while (hit := data.find(MAGIC_BYTES, start)) != -1:
        if hit % 4 == 0:
            try:
                end = unframe(_slicer(data), hit, size)[1]
            except RecordIOError:
                pass
            else:
                if end == size or data[end : end + 4] == MAGIC_BYTES:
                    return hit
        start = hit + 4 - hit % 4
    return size


@contextlib.contextmanager
def _mapped(rec_path: Path) -> Iterator[mmap.mmap | bytes]:
    """The bytes of ``rec_path``, memory-mapped (an empty file cannot be mapped: empty bytes)."""
    if rec_path.stat().st_size == 0:
        yield b""
        return
    with open(rec_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


def _slicer(data: mmap.mmap | bytes) -> Callable[[int, int], bytes]:
    """``read_at(position, size)`` over ``data``, for ``unframe``."""
    return lambda at, n: data[at : at + n]


def rebuild_index(
    rec_path: str | os.PathLike[str],
    idx_path: str | os.PathLike[str],
    keys: str = "sequential",
    on_record: Callable[[ScannedRecord], None] | None = None,
) -> int:
    """Write the ``.idx`` of ``rec_path`` by scanning it; returns the number of records.

    ``keys="sequential"`` numbers records ``0, 1, ...`` in file order, which is how
    insightface and ``FaceRecordWriter`` assign keys; ``keys="header-id"`` takes each
    record's ``IRHeader.id``, which is how im2rec assigns them (its ``.lst`` index).
    ``on_record`` is called with every record scanned (a progress bar, say).
    """
    if keys not in ("sequential", "header-id"):
        raise ValueError(f"keys must be 'sequential' or 'header-id', got {keys!r}")
    offsets: list[int] = []
    record_keys: list[int] = []
    for scanned in scan_records(rec_path):
        if on_record is not None:
            on_record(scanned)
        offsets.append(scanned.offset)
        if keys == "header-id":
            try:
                record_keys.append(unpack(scanned.record)[0].id)
            except RecordIOError as error:
                location = f"{rec_path}: record {scanned.ordinal} at offset {scanned.offset}"
                raise RecordIOError(f"{location}: {error}") from None
        else:
            record_keys.append(scanned.ordinal)
    if len(set(record_keys)) != len(record_keys):
        raise RecordIOError(f"{rec_path}: header ids repeat, so they cannot be keys: use keys='sequential'")
    write_index(idx_path, record_keys, offsets)
    return len(offsets)
