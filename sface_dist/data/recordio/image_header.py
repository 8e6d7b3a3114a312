"""mxnet's image record header (``IRHeader``), which prefixes the payload of every image record.

A payload is an ``IRHeader`` (``<IfQQ``: flag, label, id, id2), then ``flag`` float32
labels when ``flag > 0`` (the header's own label is then 0), then the image bytes.
"""

from __future__ import annotations

import numbers
import struct
from typing import NamedTuple

import numpy as np

from sface_dist.data.recordio.framing import RecordIOError

_IR_HEADER = struct.Struct("<IfQQ")


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
