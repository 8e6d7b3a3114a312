"""MXNet RecordIO (``.rec`` + ``.idx``) read and write, byte-compatible with dmlc-core, without mxnet.

A record on disk is ``uint32 magic | uint32 lrec | data | zero pad to 4 bytes`` with
``cflag = lrec >> 29`` and ``length = lrec & (2**29 - 1)``. A payload holding the magic
number at a 4-byte-aligned offset is stored as parts (cflag 1 first, 2 middle, 3 last)
split at each such magic, which is dropped on write and re-inserted on read, exactly
as dmlc's ``RecordIOWriter::WriteRecord`` / ``RecordIOReader::NextRecord`` do.

A payload is an ``IRHeader`` (``<IfQQ``: flag, label, id, id2), then ``flag`` float32
labels when ``flag > 0`` (the header's own label is then 0), then the image bytes.
The ``.idx`` file holds text lines ``key<TAB>offset``; a parsed copy of it is cached as
``<idx>.npy`` and memory-mapped, so every process of a node shares one copy of the offsets.

Face datasets come in two layouts, both read by ``FaceRecordIndex`` and written by
``FaceRecordWriter``: insightface's (record 0 with labels ``(first identity key, end key)``,
images at keys ``1..first-1`` grouped by identity, identity records holding their
``[start, end)`` image key range) and the flat im2rec one (every record is an image).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import numbers
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1
_CFLAG_WHOLE, _CFLAG_FIRST, _CFLAG_MIDDLE, _CFLAG_LAST = 0, 1, 2, 3

_IR_HEADER = struct.Struct("<IfQQ")
IR_HEADER_SIZE = _IR_HEADER.size

MAX_EXACT_KEY = 2**24
"""insightface's header and identity records store keys as float32 labels, exact only up to 2**24."""

INDEX_CACHE_MIN_BYTES = 1 << 20
"""``.idx`` files at least this large (~50k records) get a memory-mapped ``.npy`` cache by default."""


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` pair or a record that does not follow the RecordIO format."""


class IRHeader(NamedTuple):
    """Image record header; ``label`` is a tuple when the record carries several labels."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Prefix ``payload`` with ``header`` as mxnet's ``recordio.pack`` does.

    The flag is derived from the label (0 for a number, the label count for a sequence),
    whatever ``header.flag`` says.
    """
    if isinstance(header.label, numbers.Real):
        return _IR_HEADER.pack(0, float(header.label), header.id, header.id2) + payload
    labels = np.asarray(header.label, dtype="<f4").ravel()
    return _IR_HEADER.pack(labels.size, 0.0, header.id, header.id2) + labels.tobytes() + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into its header and the bytes that follow (usually an encoded image)."""
    if len(record) < _IR_HEADER.size:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than an IRHeader ({_IR_HEADER.size})")
    flag, label, id_, id2 = _IR_HEADER.unpack_from(record)
    if flag == 0:
        return IRHeader(0, label, id_, id2), record[_IR_HEADER.size :]
    end = _IR_HEADER.size + 4 * flag
    if len(record) < end:
        raise RecordIOError(f"record of {len(record)} bytes is too short for its {flag} float32 labels")
    labels = np.frombuffer(record, dtype="<f4", count=flag, offset=_IR_HEADER.size)
    return IRHeader(flag, tuple(labels.tolist()), id_, id2), record[end:]


def first_label(header: IRHeader) -> float:
    """The class label of an image record: its scalar label, or the first of several."""
    return header.label[0] if isinstance(header.label, tuple) else header.label


def frame(record: bytes) -> bytes:
    """Encode one record as dmlc-core writes it: split at aligned magics, padded to 4 bytes."""
    if len(record) > _LENGTH_MASK:
        raise RecordIOError(f"record of {len(record)} bytes exceeds the RecordIO limit of 2**29 - 1")
    chunks: list[bytes] = []
    start = 0
    hit = record.find(_MAGIC_BYTES)
    while hit != -1:
        if hit % 4 == 0:
            cflag = _CFLAG_FIRST if start == 0 else _CFLAG_MIDDLE
            chunks += [_FRAME.pack(MAGIC, (cflag << 29) | (hit - start)), record[start:hit]]
            start = hit + 4
            hit = record.find(_MAGIC_BYTES, start)
        else:
            hit = record.find(_MAGIC_BYTES, hit + 1)
    cflag = _CFLAG_LAST if start != 0 else _CFLAG_WHOLE
    chunks += [_FRAME.pack(MAGIC, (cflag << 29) | (len(record) - start)), record[start:], bytes(-len(record) % 4)]
    return b"".join(chunks)


def _unframe(read_at: Callable[[int, int], bytes], offset: int, file_size: int) -> tuple[bytes, int]:
    """Decode the record starting at ``offset``: its payload and the offset just past it.

    ``read_at(position, size)`` returns up to ``size`` bytes of the file. Errors say which
    byte is wrong; callers prefix the file and the record's key or ordinal.
    """
    parts: list[bytes] = []
    position = offset
    while True:
        head = read_at(position, _FRAME.size)
        if len(head) < _FRAME.size:
            raise RecordIOError(f"truncated record header at byte {position} (file has {file_size} bytes)")
        magic, lrec = _FRAME.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"bad magic 0x{magic:08x} at byte {position}, expected 0x{MAGIC:08x}")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        expected = (_CFLAG_WHOLE, _CFLAG_FIRST) if not parts else (_CFLAG_MIDDLE, _CFLAG_LAST)
        if cflag not in expected:
            raise RecordIOError(f"unexpected part flag {cflag} at byte {position}, expected one of {expected}")
        data = read_at(position + _FRAME.size, length)
        if len(data) < length:
            raise RecordIOError(
                f"truncated record: needs {length} bytes at byte {position + _FRAME.size}, file has {file_size}"
            )
        parts.append(data)
        position += _FRAME.size + length + (-length % 4)
        if cflag in (_CFLAG_WHOLE, _CFLAG_LAST):
            return _MAGIC_BYTES.join(parts), position


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


def read_index(idx_path: str | os.PathLike[str], cache: bool | None = None) -> np.ndarray:
    """The ``(key, offset)`` rows of a ``.idx`` file as an int64 ``[N, 2]`` array.

    With ``cache`` (default: for files of at least ``INDEX_CACHE_MIN_BYTES``) the rows are
    memory-mapped from ``<idx>.npy``, written on first use and rewritten whenever the
    ``.idx`` changes size or modification time; a folder that cannot be written to is
    read without a cache.
    """
    idx_path = Path(idx_path)
    status = idx_path.stat()
    stamp = (status.st_size, status.st_mtime_ns)
    if cache is None:
        cache = status.st_size >= INDEX_CACHE_MIN_BYTES
    cache_path = idx_path.with_name(idx_path.name + ".npy")
    if cache:
        cached = _load_index_cache(cache_path, stamp)
        if cached is not None:
            return cached
    table = _parse_index(idx_path, idx_path.read_bytes())
    if cache and _write_index_cache(cache_path, stamp, table):
        cached = _load_index_cache(cache_path, stamp)
        if cached is not None:
            return cached
    return table


def _parse_index(idx_path: Path, content: bytes) -> np.ndarray:
    """Parse ``key<TAB>offset`` lines (numpy's C tokenizer: ~0.2 s per million lines)."""
    content = content.strip()
    if not content:
        return np.empty((0, 2), dtype=np.int64)
    num_lines = content.count(b"\n") + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 1.x: partial parse instead of an error
            values = np.fromstring(content, dtype=np.int64, sep=" ")  # type: ignore[call-overload]
    except ValueError:
        values = np.empty(0, dtype=np.int64)
    if values.size != 2 * num_lines:
        raise _idx_syntax_error(idx_path, content)
    table = values.reshape(num_lines, 2)
    negative = np.flatnonzero(table[:, 1] < 0)
    if negative.size:
        row = table[negative[0]]
        raise RecordIOError(f"{idx_path}: key {row[0]} has negative offset {row[1]}")
    return table


def _idx_syntax_error(idx_path: Path, content: bytes) -> RecordIOError:
    """The error naming the first line of ``content`` that is not ``key<TAB>offset``."""
    for number, line in enumerate(content.splitlines(), start=1):
        fields = line.split()
        if len(fields) != 2 or not all(field.lstrip(b"-").isdigit() for field in fields):
            return RecordIOError(f"{idx_path}: line {number} is not 'key<TAB>offset': {line[:80]!r}")
    return RecordIOError(f"{idx_path}: not a RecordIO index")


def _load_index_cache(cache_path: Path, stamp: tuple[int, int]) -> np.ndarray | None:
    """The cached rows when ``cache_path`` exists and its first row matches ``stamp``, else None."""
    try:
        table = np.load(cache_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if table.dtype != np.int64 or table.ndim != 2 or table.shape[1] != 2 or len(table) == 0:
        return None
    if tuple(table[0].tolist()) != stamp:
        return None
    return table[1:]


def _write_index_cache(cache_path: Path, stamp: tuple[int, int], table: np.ndarray) -> bool:
    """Write ``stamp`` then ``table`` to ``cache_path`` atomically; False when the folder is read-only."""
    temporary = cache_path.with_name(f".{cache_path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as out:
            np.save(out, np.concatenate([np.asarray([stamp], dtype=np.int64), table]))
        os.replace(temporary, cache_path)
    except OSError:
        temporary.unlink(missing_ok=True)
        return False
    return True


def write_index(idx_path: str | os.PathLike[str], keys: Sequence[int] | np.ndarray, offsets: Sequence[int]) -> None:
    """Write a ``.idx`` file atomically (temporary name, then rename)."""
    idx_path = Path(idx_path)
    temporary = idx_path.with_name(f".{idx_path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "w", encoding="ascii") as out:
            out.writelines(f"{key}\t{offset}\n" for key, offset in zip(np.asarray(keys).tolist(), offsets, strict=True))
        os.replace(temporary, idx_path)
    finally:
        temporary.unlink(missing_ok=True)


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
                record, end = _unframe(_slicer(data), position, len(data))
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
                record, end = _unframe(read_at, position, size)
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
    while (hit := data.find(_MAGIC_BYTES, start)) != -1:
        if hit % 4 == 0:
            try:
                end = _unframe(_slicer(data), hit, size)[1]
            except RecordIOError:
                pass
            else:
                if end == size or data[end : end + 4] == _MAGIC_BYTES:
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
    """``read_at(position, size)`` over ``data``, for ``_unframe``."""
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
            return _unframe(lambda at, n: os.pread(fd, n, at), offset, self._rec_size)[0]
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
        past_end = np.flatnonzero(self._offsets > self._rec_size - _FRAME.size)
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


def header_record(first_identity_key: int, end_key: int) -> bytes:
    """insightface's record 0: labels ``(first identity key, end key)``, no image."""
    return pack(IRHeader(0, (float(first_identity_key), float(end_key)), 0, 0), b"")


def identity_record(start: int, end: int) -> bytes:
    """insightface's identity record: the ``[start, end)`` key range of its images."""
    return pack(IRHeader(0, (float(start), float(end)), 0, 0), b"")


def image_record(key: int, label: int, image: bytes) -> bytes:
    """An image record with a scalar label and the key as header id (as im2rec writes them)."""
    return pack(IRHeader(0, float(label), key, 0), image)


class FaceRecordWriter:
    """Writes a face dataset in the insightface layout, or flat when ``identity_sizes`` is None.

    insightface: ``identity_sizes[c]`` images of class ``c`` follow record 0 in class order
    (keys ``1..n``), then one identity record per class. Flat: images only, keys ``0..n-1``
    in the order written (the layout DALI's ``fn.readers.mxnet`` and im2rec use).
    """

    def __init__(
        self,
        rec_path: str | os.PathLike[str],
        idx_path: str | os.PathLike[str],
        identity_sizes: Sequence[int] | None,
    ) -> None:
        self._writer = RecordIOWriter(rec_path, idx_path)
        self._sizes = None if identity_sizes is None else np.asarray(identity_sizes, dtype=np.int64)
        self.num_written = 0
        if self._sizes is None:
            self._next_key = 0
            return
        num_images = int(self._sizes.sum())
        end_key = num_images + 1 + len(self._sizes)
        if end_key > MAX_EXACT_KEY:
            raise RecordIOError(
                f"{rec_path}: {num_images} images of {len(self._sizes)} identities exceed the {MAX_EXACT_KEY} keys "
                "that insightface's float32 header record can address exactly: use the flat layout"
            )
        self._label_ends = np.cumsum(self._sizes)
        self._next_key = 1
        self._writer.write(0, header_record(num_images + 1, end_key))

    def write(self, label: int, image: bytes) -> int:
        """Append one image; returns its key. insightface layout: labels must come in class order."""
        if self._sizes is not None:
            expected = int(np.searchsorted(self._label_ends, self.num_written, side="right"))
            if label != expected:
                raise RecordIOError(
                    f"{self._writer.rec_path}: image {self.num_written} has label {label}, but the identity sizes "
                    f"place class {expected} there (insightface layout writes images grouped by class)"
                )
        key = self._next_key
        self._writer.write(key, image_record(key, label, image))
        self._next_key += 1
        self.num_written += 1
        return key

    def close(self) -> None:
        """Write the identity records (insightface layout) and close both files."""
        try:
            if self._sizes is not None:
                if self.num_written != int(self._sizes.sum()):
                    raise RecordIOError(
                        f"{self._writer.rec_path}: {self.num_written} images written, identity sizes add up to "
                        f"{int(self._sizes.sum())}"
                    )
                start = 1
                for label, size in enumerate(self._sizes.tolist()):
                    self._writer.write(self._next_key + label, identity_record(start, start + size))
                    start += size
        finally:
            self._writer.close()

    def __enter__(self) -> FaceRecordWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()


class FaceRecordIndex:
    """The image records of a face ``.rec`` as insightface lays them out, or as im2rec does.

    insightface: record 0 has ``flag > 0``, labels ``(first identity key, end key)`` and no
    image; images are keys ``1 .. first identity key - 1`` and each identity record holds its
    ``[start, end)`` image key range, so ``num_classes = end key - first identity key``.
    Flat (im2rec): every key is an image and ``num_classes`` is unknown (``None``).
    """

    def __init__(self, reader: RecordIOReader) -> None:
        self.reader = reader
        self.layout = "flat"
        self.num_classes: int | None = None
        self.first_identity_key: int | None = None
        self._flat_keys: np.ndarray | None = reader.key_array
        self._num_images = len(reader)
        header, payload = self._unpack(0) if 0 in reader else (None, b"")
        if header is None or header.flag == 0 or payload:
            return
        labels = header.label
        assert isinstance(labels, tuple)
        if len(labels) < 2:
            raise RecordIOError(f"{reader.location(0)}: insightface header record needs 2 labels, has {header.flag}")
        if not all(float(label).is_integer() for label in labels[:2]):
            raise RecordIOError(f"{reader.location(0)}: header labels ({labels[0]}, {labels[1]}) are not a key range")
        first_identity, end = int(labels[0]), int(labels[1])
        if first_identity < 1 or end < first_identity:
            raise RecordIOError(f"{reader.location(0)}: header labels ({first_identity}, {end}) are not a key range")
        if first_identity > 1 and first_identity - 1 not in reader:
            raise RecordIOError(
                f"{reader.idx_path}: header record says images are keys 1..{first_identity - 1}, "
                f"but key {first_identity - 1} is missing"
            )
        self.layout = "insightface"
        self.num_classes = end - first_identity
        self.first_identity_key = first_identity
        self._flat_keys = None
        self._num_images = first_identity - 1

    @property
    def image_keys(self) -> np.ndarray:
        """Keys of the image records, in dataset order."""
        return np.arange(1, self._num_images + 1) if self._flat_keys is None else self._flat_keys

    def __len__(self) -> int:
        return self._num_images

    def key(self, index: int) -> int:
        """Record key of the ``index``-th image."""
        if not 0 <= index < self._num_images:
            raise IndexError(f"image {index} out of range for {self._num_images} images")
        return index + 1 if self._flat_keys is None else int(self._flat_keys[index])

    def require_images(self) -> None:
        """Raise, naming the file, when there is no image record to read (an empty or header-only dataset)."""
        if self._num_images:
            return
        rec_path, size = self.reader.rec_path, self.reader.file_size
        if not len(self.reader) and size:
            raise RecordIOError(
                f"{self.reader.idx_path}: empty dataset: the index lists none of the {size} bytes of {rec_path} "
                f"('convert_rec.py reindex {rec_path}' rebuilds it)"
            )
        raise RecordIOError(f"{rec_path}: empty dataset: no image records")

    def read(self, index: int) -> tuple[int, bytes]:
        """Label and encoded image bytes of the ``index``-th image.

        The label is the header's label, or the first of its labels when it carries several. It must
        be a whole number: a float32 label of 3.5 or NaN is damage, not class 3.
        """
        key = self.key(index)
        header, image = self._unpack(key)
        label = first_label(header)
        if not float(label).is_integer():
            raise RecordIOError(f"{self.reader.location(key)}: label {label} is not a whole number")
        return int(label), image

    def identity_range(self, label: int) -> tuple[int, int]:
        """``[start, end)`` image keys of class ``label`` (insightface layout only)."""
        if self.first_identity_key is None:
            raise RecordIOError(f"{self.reader.rec_path}: flat layout has no identity records")
        key = self.first_identity_key + label
        header = self._unpack(key)[0]
        if not isinstance(header.label, tuple) or len(header.label) < 2:
            raise RecordIOError(f"{self.reader.location(key)}: identity record needs 2 labels, has {header.flag}")
        return int(header.label[0]), int(header.label[1])

    def _unpack(self, key: int) -> tuple[IRHeader, bytes]:
        record = self.reader.read(key)
        try:
            return unpack(record)
        except RecordIOError as error:
            raise RecordIOError(f"{self.reader.location(key)}: {error}") from None
