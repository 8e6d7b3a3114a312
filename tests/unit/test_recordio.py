"""RecordIO framing, IRHeader packing, the insightface layout and the error messages."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from sface_dist.data.recordio import (
    MAGIC,
    FaceRecordIndex,
    FaceRecordWriter,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    frame,
    pack,
    read_index,
    rebuild_index,
    scan_records,
    unpack,
)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def write(tmp_path: Path, records: dict[int, bytes]) -> tuple[Path, Path]:
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordIOWriter(rec, idx) as writer:
        for key, record in records.items():
            writer.write(key, record)
    return rec, idx


def lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<I", (cflag << 29) | length)


def test_round_trip_single_and_multi_label(tmp_path: Path) -> None:
    records = {
        0: pack(IRHeader(0, (5.0, 9.0), 0, 0), b""),
        7: pack(IRHeader(0, 3.0, 7, 11), b"\xff\xd8jpeg"),
        3: pack(IRHeader(0, (1.5, -2.0, 4.25), 3, 0), b"abc"),
        4: b"",
    }
    rec, idx = write(tmp_path, records)
    with RecordIOReader(rec, idx) as reader:
        assert reader.keys == [0, 7, 3, 4]
        assert len(reader) == 4
        assert {key: reader.read(key) for key in records} == records
    assert unpack(records[7]) == (IRHeader(0, 3.0, 7, 11), b"\xff\xd8jpeg")
    assert unpack(records[3]) == (IRHeader(3, (1.5, -2.0, 4.25), 3, 0), b"abc")
    assert unpack(records[0]) == (IRHeader(2, (5.0, 9.0), 0, 0), b"")


def test_idx_and_framing_bytes_match_dmlc(tmp_path: Path) -> None:
    rec, idx = write(tmp_path, {0: b"abcde", 1: b"wxyz"})
    assert idx.read_text() == "0\t0\n1\t16\n"
    assert rec.read_bytes() == MAGIC_BYTES + lrec(0, 5) + b"abcde\0\0\0" + MAGIC_BYTES + lrec(0, 4) + b"wxyz"


def test_payload_with_aligned_magic_is_split_as_dmlc_does(tmp_path: Path) -> None:
    # Aligned magics at 0, 8 and 12 split the record; the one at offset 18 is unaligned and stays.
    payload = MAGIC_BYTES + b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"qr" + MAGIC_BYTES + b"s"
    expected = (
        MAGIC_BYTES + lrec(1, 0)
        + MAGIC_BYTES + lrec(2, 4) + b"abcd"
        + MAGIC_BYTES + lrec(2, 0)
        + MAGIC_BYTES + lrec(3, 7) + b"qr" + MAGIC_BYTES + b"s" + b"\0"
    )  # fmt: skip
    assert frame(payload) == expected
    assert frame(MAGIC_BYTES) == MAGIC_BYTES + lrec(1, 0) + MAGIC_BYTES + lrec(3, 0)

    records = {0: payload, 1: MAGIC_BYTES, 2: pack(IRHeader(0, 1.0, 2, 0), MAGIC_BYTES * 3 + b"x")}
    rec, idx = write(tmp_path, records)
    with RecordIOReader(rec, idx) as reader:
        assert {key: reader.read(key) for key in records} == records


def test_insightface_layout(tmp_path: Path) -> None:
    records = {0: pack(IRHeader(0, (4.0, 6.0), 0, 0), b"")}
    records |= {key: pack(IRHeader(0, (float(key % 2), 0.5), key, 0), b"img%d" % key) for key in (1, 2, 3)}
    records |= {4: pack(IRHeader(0, (1.0, 3.0), 0, 0), b""), 5: pack(IRHeader(0, (3.0, 4.0), 0, 0), b"")}
    with RecordIOReader(*write(tmp_path, records)) as reader:
        index = FaceRecordIndex(reader)
        assert index.image_keys.tolist() == [1, 2, 3]
        assert index.num_classes == 2
        assert [index.read(i) for i in range(3)] == [(1, b"img1"), (0, b"img2"), (1, b"img3")]


def test_im2rec_layout_has_every_key_as_image(tmp_path: Path) -> None:
    records = {key: pack(IRHeader(0, float(key // 2), key, 0), b"x") for key in range(4)}
    with RecordIOReader(*write(tmp_path, records)) as reader:
        index = FaceRecordIndex(reader)
        assert index.image_keys.tolist() == [0, 1, 2, 3]
        assert index.num_classes is None
        assert [index.read(i)[0] for i in range(4)] == [0, 0, 1, 1]


def test_reader_reopens_after_pickle_and_fork(tmp_path: Path) -> None:
    records = {0: b"first", 1: b"second"}
    reader = RecordIOReader(*write(tmp_path, records))
    assert reader.read(0) == b"first"
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(1) == b"second"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, reader.read(1))
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 100) == b"second"
    reader.close()


def test_truncated_record_names_file_key_and_offset(tmp_path: Path) -> None:
    rec, idx = write(tmp_path, {0: b"a" * 40, 1: b"b" * 40})
    os.truncate(rec, rec.stat().st_size - 10)
    with RecordIOReader(rec, idx) as reader:
        assert reader.read(0) == b"a" * 40
        with pytest.raises(RecordIOError, match=rf"{rec}: key 1 at offset 48: truncated record"):
            reader.read(1)


def test_wrong_magic_names_file_key_and_offset(tmp_path: Path) -> None:
    rec, idx = write(tmp_path, {0: b"a" * 8, 1: b"b" * 8})
    data = bytearray(rec.read_bytes())
    data[16:20] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    with RecordIOReader(rec, idx) as reader:
        with pytest.raises(RecordIOError, match=rf"{rec}: key 1 at offset 16: bad magic 0x00000000"):
            reader.read(1)


def test_idx_offset_that_is_not_a_record_start(tmp_path: Path) -> None:
    rec, idx = write(tmp_path, {0: b"a" * 8})
    idx.write_text("0\t4\n")
    with RecordIOReader(rec, idx) as reader, pytest.raises(RecordIOError, match="key 0 at offset 4: bad magic"):
        reader.read(0)


def test_missing_files_are_clear_errors(tmp_path: Path) -> None:
    rec, idx = write(tmp_path, {0: b"a"})
    with pytest.raises(RecordIOError, match=rf"{tmp_path / 'other.idx'}: RecordIO index not found"):
        RecordIOReader(rec, tmp_path / "other.idx")
    with pytest.raises(RecordIOError, match=rf"{tmp_path / 'other.rec'}: RecordIO file not found"):
        RecordIOReader(tmp_path / "other.rec", idx)


def test_idx_offset_past_the_end(tmp_path: Path) -> None:
    rec, idx = write(tmp_path, {0: b"a", 1: b"b"})
    idx.write_text("0\t0\n1\t4096\n")
    with pytest.raises(RecordIOError, match=rf"{idx}: key 1 has offset 4096 past the end of {rec} \(24 bytes\)"):
        RecordIOReader(rec, idx)


def test_malformed_idx_line(tmp_path: Path) -> None:
    rec, idx = write(tmp_path, {0: b"a", 1: b"b"})
    idx.write_text("0\t0\n1\tnot-a-number\n")
    with pytest.raises(RecordIOError, match=rf"{idx}: line 2 is not 'key<TAB>offset'"):
        RecordIOReader(rec, idx)


def test_unknown_key_and_duplicate_key(tmp_path: Path) -> None:
    rec, idx = write(tmp_path, {0: b"a"})
    with RecordIOReader(rec, idx) as reader, pytest.raises(KeyError, match="no key 5"):
        reader.read(5)
    with RecordIOWriter(rec, idx) as writer:
        writer.write(3, b"x")
        writer.write(3, b"y")
    with pytest.raises(RecordIOError, match=rf"{idx}: key 3 appears more than once"):
        RecordIOReader(rec, idx)


def test_short_record_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecordIOError, match="shorter than an IRHeader"):
        unpack(b"abc")
    with pytest.raises(RecordIOError, match="too short for its 3 float32 labels"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 4)
    with RecordIOReader(*write(tmp_path, {0: b"short"})) as reader:
        with pytest.raises(RecordIOError, match=r"t.rec: key 0 at offset 0: record of 5 bytes is shorter"):
            FaceRecordIndex(reader)


def test_index_cache_is_memory_mapped_and_follows_the_idx(tmp_path: Path) -> None:
    rec, idx = write(tmp_path, {key: b"r%d" % key for key in range(5)})
    table = read_index(idx, cache=True)
    cache = tmp_path / "t.idx.npy"
    assert isinstance(table, np.memmap) and cache.is_file()
    assert table.tolist() == [[key, 12 * key] for key in range(5)]
    assert read_index(idx, cache=True).tolist() == table.tolist()
    with RecordIOWriter(rec, idx) as writer:  # a rewritten .idx invalidates the cache
        writer.write(9, b"only")
    assert read_index(idx, cache=True).tolist() == [[9, 0]]
    with RecordIOReader(rec, idx, cache=True) as reader:
        assert reader.read(9) == b"only"
    assert read_index(idx, cache=False).tolist() == [[9, 0]]
    assert not isinstance(read_index(idx, cache=False), np.memmap)


def test_index_cache_is_skipped_in_a_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, idx = write(tmp_path, {0: b"a", 1: b"b"})
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(PermissionError("read-only")))
    assert read_index(idx, cache=True).tolist() == [[0, 0], [1, 12]]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["t.idx", "t.rec"]


def test_keys_in_any_order_are_found(tmp_path: Path) -> None:
    records = {key: b"v%d" % key for key in (40, 3, 17, -2, 8)}
    with RecordIOReader(*write(tmp_path, records)) as reader:
        assert {key: reader.read(key) for key in records} == records
        assert 5 not in reader and 40 in reader


def test_scan_and_rebuild_index(tmp_path: Path) -> None:
    records = {0: b"abc", 1: MAGIC_BYTES * 2 + b"z", 2: pack(IRHeader(0, 1.0, 77, 0), b"q")}
    rec, idx = write(tmp_path, records)
    original = idx.read_bytes()
    idx.unlink()
    assert rebuild_index(rec, idx) == 3
    assert idx.read_bytes() == original
    assert [scanned.record for scanned in scan_records(rec)] == list(records.values())


def test_scan_names_the_record_and_offset_of_broken_framing(tmp_path: Path) -> None:
    rec, _ = write(tmp_path, {0: b"a" * 8, 1: b"b" * 8, 2: b"c" * 8})
    data = bytearray(rec.read_bytes())
    data[16:20] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"{rec}: record 1 at offset 16: bad magic 0x00000000 at byte 16"):
        list(scan_records(rec))
    os.truncate(rec, 30)
    with pytest.raises(RecordIOError, match=rf"{rec}: record 1 at offset 16: "):
        rebuild_index(rec, tmp_path / "new.idx")
    assert not (tmp_path / "new.idx").exists()


def test_face_record_writer_layouts(tmp_path: Path) -> None:
    with FaceRecordWriter(tmp_path / "i.rec", tmp_path / "i.idx", identity_sizes=[2, 1]) as writer:
        for label, image in [(0, b"a"), (0, b"b"), (1, b"c")]:
            writer.write(label, image)
    with RecordIOReader(tmp_path / "i.rec", tmp_path / "i.idx") as reader:
        index = FaceRecordIndex(reader)
        assert (index.layout, index.num_classes, reader.keys) == ("insightface", 2, [0, 1, 2, 3, 4, 5])
        assert [index.read(i) for i in range(3)] == [(0, b"a"), (0, b"b"), (1, b"c")]
        assert [index.identity_range(label) for label in (0, 1)] == [(1, 3), (3, 4)]
    with FaceRecordWriter(tmp_path / "f.rec", tmp_path / "f.idx", identity_sizes=None) as writer:
        assert [writer.write(label, b"x") for label in (4, 0, 2)] == [0, 1, 2]
    with RecordIOReader(tmp_path / "f.rec", tmp_path / "f.idx") as reader:
        index = FaceRecordIndex(reader)
        assert (index.layout, index.num_classes, len(index)) == ("flat", None, 3)
        assert [index.read(i)[0] for i in range(3)] == [4, 0, 2]


def test_face_record_writer_rejects_out_of_order_labels_and_missing_images(tmp_path: Path) -> None:
    with pytest.raises(RecordIOError, match="image 1 has label 1, but the identity sizes place class 0 there"):
        with FaceRecordWriter(tmp_path / "i.rec", tmp_path / "i.idx", identity_sizes=[2, 1]) as writer:
            writer.write(0, b"a")
            writer.write(1, b"b")
    writer = FaceRecordWriter(tmp_path / "i.rec", tmp_path / "i.idx", identity_sizes=[2, 1])
    writer.write(0, b"a")
    with pytest.raises(RecordIOError, match="1 images written, identity sizes add up to 3"):
        writer.close()


def test_multi_label_image_at_key_0_is_not_a_header(tmp_path: Path) -> None:
    records = {key: pack(IRHeader(0, (float(key), 7.0), key, 0), b"\xff\xd8\xffimg") for key in range(3)}
    with RecordIOReader(*write(tmp_path, records)) as reader:
        index = FaceRecordIndex(reader)
        assert (index.layout, len(index), index.read(2)[0]) == ("flat", 3, 2)
