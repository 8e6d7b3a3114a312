"""Live cross-check against mxnet, where it imports (it needs numpy < 1.24, so CI usually skips this).

Run it with the throwaway mxnet environment of ``tests/golden/make_golden.py`` plus pytest:
``PYTHONPATH=. /tmp/mxvenv/bin/python -m pytest -q tests/unit/test_mxnet_live.py``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from sface_dist.data.recordio import IRHeader, RecordIOReader, RecordIOWriter, pack, unpack


def _import_mxnet() -> object:
    try:
        import mxnet  # DALI stays optional, and broken under numpy >= 1.24
    except Exception as error:  # mxnet raises AttributeError (np.bool), not ImportError, under new numpy
        pytest.skip(f"mxnet is not importable here: {type(error).__name__}: {error}")
    return mxnet


MAGIC = struct.pack("<I", 0xCED7230A)


def random_records(seed: int, count: int = 200) -> dict[int, bytes]:
    """Payloads of random lengths, a quarter laced with magics at random (aligned or not) offsets."""
    rng = np.random.default_rng(seed)
    records = {}
    for key in rng.permutation(count * 3)[:count].tolist():
        payload = bytearray(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        if rng.random() < 0.25:
            for at in rng.integers(0, len(payload) + 1, int(rng.integers(1, 4))).tolist():
                payload[at:at] = MAGIC
        label: float | tuple[float, ...] = float(rng.integers(0, 1000))
        if rng.random() < 0.3:
            label = tuple(rng.normal(size=int(rng.integers(1, 5))).astype(np.float32).tolist())
        records[key] = pack(IRHeader(0, label, key, int(rng.integers(0, 2**40))), bytes(payload))
    return records


def test_mxnet_reads_what_we_write(tmp_path: Path) -> None:
    mx = _import_mxnet()
    records = random_records(0)
    with RecordIOWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as writer:
        for key, record in records.items():
            writer.write(key, record)
    reader = mx.recordio.MXIndexedRecordIO(str(tmp_path / "ours.idx"), str(tmp_path / "ours.rec"), "r")
    assert list(reader.keys) == list(records)
    for key, record in records.items():
        assert reader.read_idx(key) == record
        header = mx.recordio.unpack(record)[0]
        ours = unpack(record)[0]
        label = tuple(header.label.tolist()) if isinstance(header.label, np.ndarray) else header.label
        assert (header.flag, label, header.id, header.id2) == (ours.flag, ours.label, ours.id, ours.id2)
    reader.close()


def test_we_read_and_rewrite_what_mxnet_writes(tmp_path: Path) -> None:
    mx = _import_mxnet()
    records = random_records(1)
    writer = mx.recordio.MXIndexedRecordIO(str(tmp_path / "mx.idx"), str(tmp_path / "mx.rec"), "w")
    for key, record in records.items():
        writer.write_idx(key, record)
    writer.close()
    with RecordIOReader(tmp_path / "mx.rec", tmp_path / "mx.idx") as reader:
        assert {key: reader.read(key) for key in reader.keys} == records
    with RecordIOWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as ours:
        for key, record in records.items():
            ours.write(key, record)
    assert (tmp_path / "ours.rec").read_bytes() == (tmp_path / "mx.rec").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "mx.idx").read_bytes()
