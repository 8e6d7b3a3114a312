"""MXNet RecordIO (``.rec`` + ``.idx``) read and write, byte-compatible with dmlc-core, without mxnet.

A record on disk is ``uint32 magic | uint32 lrec | data | zero pad to 4 bytes`` with
``cflag = lrec >> 29`` and ``length = lrec & (2**29 - 1)``. A payload holding the magic
number at a 4-byte-aligned offset is stored as parts (cflag 1 first, 2 middle, 3 last)
split at each such magic, which is dropped on write and re-inserted on read, exactly
as dmlc's ``RecordIOWriter::WriteRecord`` / ``RecordIOReader::NextRecord`` do.

A payload is an ``IRHeader`` (``<IfQQ``: flag, label, id, id2), then ``flag`` float32
labels when ``flag > 0`` (the header's own label is then 0), then the image bytes.
The ``.idx`` file holds text lines ``key<TAB>offset``.
"""

from __future__ import annotations

import io
import numbers
import os
import struct
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


class RecordIOReader:
    """Random access to the records of a ``.rec`` file through its ``.idx``.

    The ``.rec`` file is opened on first read and reopened in a forked child, and the
    reader pickles without its file handle, so one instance can be handed to DataLoader
    workers. Keys and offsets live in numpy arrays (~32 bytes per record, no Python objects).
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        if not self.rec_path.is_file():
            raise RecordIOError(f"{self.rec_path}: RecordIO file not found")
        if not self.idx_path.is_file():
            raise RecordIOError(f"{self.idx_path}: RecordIO index not found (needed next to {self.rec_path.name})")
        self._rec_size = self.rec_path.stat().st_size
        self._keys, self._offsets = _read_idx(self.idx_path)
        self._check_offsets()
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
        """Keys in ``.idx`` order as an int64 array (no per-key Python objects)."""
        return self._keys.copy()

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
        """``file, key, offset`` of a record, for error messages."""
        return f"{self.rec_path}: key {key} at offset {self.offset(key)}"

    def read(self, key: int) -> bytes:
        """The record stored under ``key``, with split parts joined back."""
        offset = self.offset(key)
        fd = self._fd()
        parts: list[bytes] = []
        position = offset
        while True:
            head = os.pread(fd, _FRAME.size, position)
            if len(head) < _FRAME.size:
                raise self._error(
                    key, offset, f"truncated record header at byte {position} (file has {self._rec_size} bytes)"
                )
            magic, lrec = _FRAME.unpack(head)
            if magic != MAGIC:
                raise self._error(
                    key, offset, f"bad magic 0x{magic:08x} at byte {position}, expected 0x{MAGIC:08x}"
                )
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            expected = (_CFLAG_WHOLE, _CFLAG_FIRST) if not parts else (_CFLAG_MIDDLE, _CFLAG_LAST)
            if cflag not in expected:
                raise self._error(
                    key, offset, f"unexpected part flag {cflag} at byte {position}, expected one of {expected}"
                )
            data = os.pread(fd, length, position + _FRAME.size)
            if len(data) < length:
                raise self._error(
                    key,
                    offset,
                    f"truncated record: needs {length} bytes at byte {position + _FRAME.size}, "
                    f"file has {self._rec_size}",
                )
            parts.append(data)
            if cflag in (_CFLAG_WHOLE, _CFLAG_LAST):
                return _MAGIC_BYTES.join(parts)
            position += _FRAME.size + length + (-length % 4)

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
        i = int(np.searchsorted(self._sorted_keys, key))
        if i == len(self._sorted_keys) or self._sorted_keys[i] != key:
            return None
        return int(self._sort[i])

    def _check_offsets(self) -> None:
        past_end = np.flatnonzero(self._offsets + _FRAME.size > self._rec_size)
        if past_end.size:
            i = past_end[0]
            raise RecordIOError(
                f"{self.idx_path}: key {self._keys[i]} has offset {self._offsets[i]} past the end of "
                f"{self.rec_path} ({self._rec_size} bytes)"
            )

    def _error(self, key: int, offset: int, message: str) -> RecordIOError:
        return RecordIOError(f"{self.rec_path}: key {key} at offset {offset}: {message}")


class _PidFile(NamedTuple):
    handle: io.FileIO
    pid: int


def _read_idx(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines into int64 key and offset arrays."""
    content = idx_path.read_bytes()
    num_lines = content.count(b"\n") + (not content.endswith(b"\n") and bool(content))
    tokens = content.split()
    try:
        if len(tokens) != 2 * num_lines:
            raise ValueError
        pairs = np.array(tokens, dtype=np.int64).reshape(num_lines, 2)
    except ValueError:
        raise _idx_syntax_error(idx_path, content) from None
    keys, offsets = pairs[:, 0].copy(), pairs[:, 1].copy()
    negative = np.flatnonzero(offsets < 0)
    if negative.size:
        raise RecordIOError(f"{idx_path}: key {keys[negative[0]]} has negative offset {offsets[negative[0]]}")
    return keys, offsets


def _idx_syntax_error(idx_path: Path, content: bytes) -> RecordIOError:
    """The error naming the first line of ``content`` that is not ``key<TAB>offset``."""
    for number, line in enumerate(content.splitlines(), start=1):
        fields = line.split()
        if len(fields) != 2 or not all(field.lstrip(b"-").isdigit() for field in fields):
            return RecordIOError(f"{idx_path}: line {number} is not 'key<TAB>offset': {line[:80]!r}")
    return RecordIOError(f"{idx_path}: not a RecordIO index")


class FaceRecordIndex:
    """The image records of a face ``.rec`` as insightface lays them out, or as im2rec does.

    insightface: record 0 has ``flag > 0`` and labels ``(first identity key, end key)``;
    images are keys ``1 .. first identity key - 1`` and each identity record holds its
    ``[start, end)`` image key range, so ``num_classes = end key - first identity key``.
    im2rec: every key is an image and ``num_classes`` is unknown (``None``).
    """

    def __init__(self, reader: RecordIOReader) -> None:
        self.reader = reader
        header = self._unpack(0)[0] if 0 in reader else None
        if header is None or header.flag == 0:
            self.image_keys = reader.key_array
            self.num_classes: int | None = None
            return
        labels = header.label
        if not isinstance(labels, tuple) or len(labels) < 2:
            raise RecordIOError(f"{reader.location(0)}: insightface header record needs 2 labels, has {header.flag}")
        first_identity, end = int(labels[0]), int(labels[1])
        if first_identity < 1 or end < first_identity:
            raise RecordIOError(f"{reader.location(0)}: header labels ({first_identity}, {end}) are not a key range")
        if first_identity > 1 and first_identity - 1 not in reader:
            raise RecordIOError(
                f"{reader.idx_path}: header record says images are keys 1..{first_identity - 1}, "
                f"but key {first_identity - 1} is missing"
            )
        self.image_keys = np.arange(1, first_identity, dtype=np.int64)
        self.num_classes = end - first_identity

    def __len__(self) -> int:
        return len(self.image_keys)

    def key(self, index: int) -> int:
        """Record key of the ``index``-th image."""
        return int(self.image_keys[index])

    def read(self, index: int) -> tuple[int, bytes]:
        """Label and encoded image bytes of the ``index``-th image.

        The label is the header's label, or the first of its labels when it carries several.
        """
        header, image = self._unpack(self.key(index))
        label = header.label[0] if isinstance(header.label, tuple) else header.label
        return int(label), image

    def _unpack(self, key: int) -> tuple[IRHeader, bytes]:
        record = self.reader.read(key)
        try:
            return unpack(record)
        except RecordIOError as error:
            raise RecordIOError(f"{self.reader.location(key)}: {error}") from None
