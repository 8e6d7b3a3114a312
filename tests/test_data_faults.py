"""Every bad input is one line naming the file, key and offset: non-whole labels, and ``inspect --verify`` on
damaged or empty datasets."""

from __future__ import annotations

import io
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sface_dist.config import DataConfig
from sface_dist.data.convert import rec_to_folder, repack
from sface_dist.data.errors import DataError
from sface_dist.data.inspection import inspect_rec
from sface_dist.data.loader import build_loader
from sface_dist.data.recordio import (
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    header_record,
    pack,
)

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4
SMALL = 8
"""Image side of the test datasets."""


def png(index: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), index % 256, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(
    root: Path,
    num_images: int,
    size: int = SMALL,
    labels: dict[int, float] | None = None,
    payloads: dict[int, bytes] | None = None,
) -> Path:
    """An insightface-layout dataset whose image ``i`` (key ``i + 1``) is class ``i % 4``; returns ``train.rec``.

    ``labels`` and ``payloads`` replace the label or the image bytes of some images.
    """
    root.mkdir(parents=True, exist_ok=True)
    labels, payloads = labels or {}, payloads or {}
    with RecordIOWriter(root / "train.rec", root / "train.idx") as writer:
        writer.write(0, header_record(num_images + 1, num_images + 1 + NUM_CLASSES))
        for i in range(num_images):
            image = payloads.get(i, png(i, size))
            writer.write(i + 1, pack(IRHeader(0, labels.get(i, float(i % NUM_CLASSES)), i + 1, 0), image))
    (root / "property").write_text(f"{NUM_CLASSES},{size},{size}\n")
    return root / "train.rec"


def offset_of(rec: Path, key: int) -> int:
    with RecordIOReader(rec, rec.with_suffix(".idx")) as reader:
        return reader.offset(key)


def overwrite(rec: Path, at: int, data: bytes) -> None:
    content = bytearray(rec.read_bytes())
    content[at : at + len(data)] = data
    rec.write_bytes(bytes(content))


def location(rec: Path, key: int) -> str:
    return f"{rec}: key {key} at offset {offset_of(rec, key)}"


def test_inspect_verify_reports_labels_that_are_not_whole_numbers(tmp_path: Path) -> None:
    rec = write_dataset(tmp_path, 8, labels={1: 3.5, 4: math.nan, 6: -math.inf})
    report = inspect_rec(rec, verify=True, progress=False, workers=0)
    assert report.problems == [
        f"{location(rec, 2)}: label 3.5 is not a whole number",
        f"{location(rec, 5)}: label nan is not a whole number",
        f"{location(rec, 7)}: label -inf is not a whole number",
    ]
    assert (report.label_min, report.label_max, report.num_labels_used) == (0, 3, 4)


def test_header_record_labels_that_are_not_whole_numbers_are_one_line(tmp_path: Path) -> None:
    """insightface's record 0 holds its key range as float32 labels: NaN there is a bad header, not a traceback."""
    rec = write_dataset(tmp_path, 4)
    overwrite(rec, 8 + 24, struct.pack("<f", math.nan))  # after the frame and the IRHeader: the first label
    result = subprocess.run(
        [sys.executable, "tools/convert_rec.py", "inspect", str(rec), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {rec}: key 0 at offset 0: header labels (nan, 9.0) are not a key range\n"


# Where in key 51's frame header bytes are overwritten (0: magic, 4: length), with what (given the record's length),
# and the problem reported: at {O}, key 51's offset; running to {end}; or at {inside}, 4 bytes into its payload.
FRAME_DAMAGE = {
    "magic zeroed": (0, lambda length: b"\0\0\0\0", r"bad magic 0x00000000 at byte {O}, expected 0xced7230a; "),
    "length longer": (
        4,
        lambda length: struct.pack("<I", length + 64),
        r"damaged length: the record would run to byte {end}, past the next record; ",
    ),
    "length shorter": (4, lambda length: struct.pack("<I", 4), r"bad magic 0x40000000 at byte {inside}, expected 0x"),
}


@pytest.mark.parametrize("damage", list(FRAME_DAMAGE))
def test_inspect_verify_resynchronises_after_damaged_bytes(tmp_path: Path, damage: str) -> None:
    """A few bytes overwritten in one frame header of a 300-image file are one problem, not 250."""
    rec = write_dataset(tmp_path, 300)
    offset, next_offset = offset_of(rec, 51), offset_of(rec, 52)
    at, data, problem = FRAME_DAMAGE[damage]
    overwrite(rec, offset + at, data(next_offset - offset - 8))
    report = inspect_rec(rec, verify=True, progress=False, workers=0)
    assert report.num_problems == 1, report.problems
    expected = re.escape(f"{location(rec, 51)}: ") + problem.format(O=offset, end=next_offset + 64, inside=offset + 12)
    assert re.match(expected, report.problems[0]), report.problems
    assert report.problems[0].endswith(f" bytes to the next record, at byte {next_offset}"), report.problems


@pytest.mark.parametrize("layout", ["no records", "header record only"])
def test_empty_dataset_is_one_line(tmp_path: Path, layout: str) -> None:
    rec = tmp_path / "train.rec"
    if layout == "no records":
        rec.write_bytes(b"")
        rec.with_suffix(".idx").write_text("")
    else:
        write_dataset(tmp_path, 0)
    result = subprocess.run(
        [sys.executable, "tools/convert_rec.py", "inspect", str(rec), "--verify", "--quiet"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {rec}: empty dataset: no image records\n"
    with pytest.raises(DataError, match=rf"^{re.escape(str(rec))}: empty dataset: no image records$"):
        build_loader(DataConfig(root=str(tmp_path), image_size=SMALL, num_classes=NUM_CLASSES), 0, 1, seed=0)
    for convert in (repack, rec_to_folder):
        with pytest.raises(RecordIOError, match=rf"^{re.escape(str(rec))}: empty dataset: no image records$"):
            convert(rec, tmp_path / "out", progress=False)


def test_empty_index_of_a_non_empty_rec_says_so(tmp_path: Path) -> None:
    rec = write_dataset(tmp_path, 2)
    rec.with_suffix(".idx").write_text("")
    with pytest.raises(RecordIOError, match=rf"^{re.escape(str(rec.with_suffix('.idx')))}: empty dataset: the index"):
        inspect_rec(rec, progress=False, workers=0)
