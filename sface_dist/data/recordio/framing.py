"""The dmlc-core record frame, byte for byte: how one record's bytes are laid out in a ``.rec`` file.

A record on disk is ``uint32 magic | uint32 lrec | data | zero pad to 4 bytes`` with
``cflag = lrec >> 29`` and ``length = lrec & (2**29 - 1)``. A payload holding the magic
number at a 4-byte-aligned offset is stored as parts (cflag 1 first, 2 middle, 3 last)
split at each such magic, which is dropped on write and re-inserted on read, exactly
as dmlc's ``RecordIOWriter::WriteRecord`` / ``RecordIOReader::NextRecord`` do.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
FRAME_SIZE = _FRAME.size
"""Bytes of a frame header (magic and ``lrec``): the smallest a record can be on disk."""
_LENGTH_MASK = (1 << 29) - 1
_CFLAG_WHOLE, _CFLAG_FIRST, _CFLAG_MIDDLE, _CFLAG_LAST = 0, 1, 2, 3


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` pair or a record that does not follow the RecordIO format."""


def frame(record: bytes) -> bytes:
    """Encode one record as dmlc-core writes it: split at aligned magics, padded to 4 bytes."""
    if len(record) > _LENGTH_MASK:
        raise RecordIOError(f"record of {len(record)} bytes exceeds the RecordIO limit of 2**29 - 1")
    chunks: list[bytes] = []
    start = 0
    hit = record.find(MAGIC_BYTES)
    while hit != -1:
        if hit % 4 == 0:
            cflag = _CFLAG_FIRST if start == 0 else _CFLAG_MIDDLE
            chunks += [_FRAME.pack(MAGIC, (cflag << 29) | (hit - start)), record[start:hit]]
            start = hit + 4
            hit = record.find(MAGIC_BYTES, start)
        else:
            hit = record.find(MAGIC_BYTES, hit + 1)
    cflag = _CFLAG_LAST if start != 0 else _CFLAG_WHOLE
    chunks += [_FRAME.pack(MAGIC, (cflag << 29) | (len(record) - start)), record[start:], bytes(-len(record) % 4)]
    return b"".join(chunks)


def unframe(read_at: Callable[[int, int], bytes], offset: int, file_size: int) -> tuple[bytes, int]:
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
            return MAGIC_BYTES.join(parts), position
