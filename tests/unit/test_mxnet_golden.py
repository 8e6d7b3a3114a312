"""Byte compatibility with mxnet 1.9.1: read and rewrite the golden files it wrote (``tests/golden``)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sface_dist.data.recordio import (
    FaceRecordIndex,
    FaceRecordWriter,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    pack,
    rebuild_index,
    scan_records,
    unpack,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
NAMES = sorted(EXPECTED)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_reads_what_mxnet_wrote(name: str) -> None:
    with RecordIOReader(GOLDEN / f"{name}.rec", GOLDEN / f"{name}.idx") as reader:
        assert reader.keys == [row["key"] for row in EXPECTED[name]]
        for row in EXPECTED[name]:
            record = reader.read(row["key"])
            assert reader.offset(row["key"]) == row["offset"]
            assert (len(record), sha256(record)) == (row["record_length"], row["record_sha256"])
            if "flag" not in row:
                continue
            header, payload = unpack(record)
            label = list(header.label) if isinstance(header.label, tuple) else header.label
            assert (header.flag, label, header.id, header.id2) == (row["flag"], row["label"], row["id"], row["id2"])
            assert (len(payload), sha256(payload)) == (row["payload_length"], row["payload_sha256"])


@pytest.mark.parametrize("name", NAMES)
def test_writes_the_bytes_mxnet_wrote(name: str, tmp_path: Path) -> None:
    with RecordIOReader(GOLDEN / f"{name}.rec", GOLDEN / f"{name}.idx") as reader:
        records = [(key, reader.read(key)) for key in reader.keys]
    with RecordIOWriter(tmp_path / "out.rec", tmp_path / "out.idx") as writer:
        for key, record in records:
            writer.write(key, record)
    assert (tmp_path / "out.rec").read_bytes() == (GOLDEN / f"{name}.rec").read_bytes()
    assert (tmp_path / "out.idx").read_bytes() == (GOLDEN / f"{name}.idx").read_bytes()


def test_packs_headers_as_mxnet_does(tmp_path: Path) -> None:
    """Rebuild single, multi and split from their specification (as make_golden.py states it)."""
    magic = (0xCED7230A).to_bytes(4, "little")
    specs = {
        "single": {key: pack(IRHeader(0, float(key % 3), key, 0), b"img" * key + b"x" * (key % 4)) for key in range(5)},
        "multi": {key: pack(IRHeader(0, (float(key), 0.5, -2.25), key, 7), b"payload%d" % key) for key in (3, 1, 2)},
        "split": {
            0: pack(IRHeader(0, 1.0, 0, 0), magic + b"abcd" + magic + magic + b"qr" + magic + b"s"),
            1: magic,
            2: pack(IRHeader(0, 2.0, 2, 0), b"tail" + magic * 3),
        },
    }
    for name, records in specs.items():
        with RecordIOWriter(tmp_path / f"{name}.rec", tmp_path / f"{name}.idx") as writer:
            for key, record in records.items():
                writer.write(key, record)
        assert (tmp_path / f"{name}.rec").read_bytes() == (GOLDEN / f"{name}.rec").read_bytes(), name
        assert (tmp_path / f"{name}.idx").read_bytes() == (GOLDEN / f"{name}.idx").read_bytes(), name


def test_split_record_framing_is_dmlc_s() -> None:
    framed = (GOLDEN / "split.rec").read_bytes()
    flags = []
    position = 0
    while position < 68:  # record 0: three parts split at the aligned magics
        lrec = int.from_bytes(framed[position + 4 : position + 8], "little")
        flags.append(lrec >> 29)
        position += 8 + (lrec & (2**29 - 1)) + (-(lrec & (2**29 - 1)) % 4)
    assert flags == [1, 2, 2, 3]


def test_insightface_layout_written_by_mxnet(tmp_path: Path) -> None:
    with RecordIOReader(GOLDEN / "insightface.rec", GOLDEN / "insightface.idx") as reader:
        index = FaceRecordIndex(reader)
        assert (index.layout, index.num_classes, len(index)) == ("insightface", 2, 4)
        assert [index.identity_range(label) for label in (0, 1)] == [(1, 4), (4, 5)]
        images = [index.read(i) for i in range(4)]
    assert [label for label, _ in images] == [0, 0, 0, 1]
    decoded_by_mxnet = np.load(GOLDEN / "decoded.npy")
    sources = np.load(GOLDEN / "pixels.npy")
    for (_, encoded), by_mxnet, source in zip(images, decoded_by_mxnet, sources, strict=True):
        with Image.open(io.BytesIO(encoded)) as image:
            pixels = np.asarray(image.convert("RGB")).astype(np.int16)
        assert np.abs(pixels - by_mxnet).max() <= 2  # libjpeg builds may round a level apart
        assert np.abs(pixels - source).mean() < 3
    assert np.array_equal(pixels, sources[3])  # the PNG is lossless: exact

    with FaceRecordWriter(tmp_path / "out.rec", tmp_path / "out.idx", identity_sizes=[3, 1]) as writer:
        for label, encoded in images:
            writer.write(label, encoded)
    assert (tmp_path / "out.rec").read_bytes() == (GOLDEN / "insightface.rec").read_bytes()
    assert (tmp_path / "out.idx").read_bytes() == (GOLDEN / "insightface.idx").read_bytes()


@pytest.mark.parametrize(("name", "keys"), [("single", "sequential"), ("insightface", "sequential"),
                                            ("split", "sequential"), ("multi", "header-id")])  # fmt: skip
def test_rebuilt_index_equals_mxnet_s(name: str, keys: str, tmp_path: Path) -> None:
    shutil.copy(GOLDEN / f"{name}.rec", tmp_path / "lost.rec")
    count = rebuild_index(tmp_path / "lost.rec", tmp_path / "lost.idx", keys=keys)
    assert count == len(EXPECTED[name])
    assert (tmp_path / "lost.idx").read_bytes() == (GOLDEN / f"{name}.idx").read_bytes()
    assert [scanned.offset for scanned in scan_records(GOLDEN / f"{name}.rec")] == sorted(
        row["offset"] for row in EXPECTED[name]
    )
