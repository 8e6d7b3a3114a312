"""``folder_to_rec`` and its CLI on a tiny generated folder tree."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sface_dist.data.convert import ConvertError, folder_to_rec
from sface_dist.data.recordio import FaceRecordIndex, RecordIOReader, unpack

REPO = Path(__file__).resolve().parents[1]
COUNTS = {"alice": 3, "bob": 1, "carol": 2}


def make_tree(root: Path) -> None:
    """Identities of mixed formats and sizes: PNG 112, JPEG 64, grey BMP 120."""
    rng = np.random.default_rng(0)
    for name, count in COUNTS.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            size, ext = [(112, "png"), (64, "jpg"), (120, "bmp")][i]
            shape = (size, size) if ext == "bmp" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i}.{ext}")
    (root / "alice" / "notes.txt").write_text("not an image, skipped by extension")


def test_folder_to_rec_layout(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    summary = folder_to_rec(tmp_path / "in", tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert (summary.num_classes, summary.num_images) == (3, 6)
    assert (out / "property").read_text() == "3,112,112\n"
    assert (out / "classes.txt").read_text().split() == ["alice", "bob", "carol"]
    assert sorted(path.name for path in out.iterdir()) == ["classes.txt", "property", "train.idx", "train.rec"]

    with RecordIOReader(out / "train.rec", out / "train.idx") as reader:
        assert reader.keys == list(range(10))
        header0 = unpack(reader.read(0))[0]
        assert header0.flag == 2 and header0.label == (7.0, 10.0)
        index = FaceRecordIndex(reader)
        assert index.image_keys.tolist() == [1, 2, 3, 4, 5, 6]
        assert index.num_classes == 3
        labels = []
        for i in range(len(index)):
            label, jpeg = index.read(i)
            labels.append(label)
            with Image.open(io.BytesIO(jpeg)) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (112, 112))
        assert labels == [0, 0, 0, 1, 2, 2]
        ranges = [unpack(reader.read(key))[0].label for key in (7, 8, 9)]
        assert ranges == [(1.0, 4.0), (4.0, 5.0), (5.0, 7.0)]


def test_unreadable_image_names_the_file_and_keeps_existing_output(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path / "out", progress=False)
    before = (tmp_path / "out" / "train.rec").read_bytes()
    broken = tmp_path / "in" / "bob" / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ConvertError, match=rf"{broken}: cannot read image"):
        folder_to_rec(tmp_path / "in", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "train.rec").read_bytes() == before
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "classes.txt",
        "property",
        "train.idx",
        "train.rec",
    ]


def test_bad_trees_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="not a directory"):
        folder_to_rec(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "in").mkdir()
    with pytest.raises(ConvertError, match="no identity sub-folders"):
        folder_to_rec(tmp_path / "in", tmp_path / "out", progress=False)
    (tmp_path / "in" / "empty").mkdir()
    with pytest.raises(ConvertError, match=rf"{tmp_path / 'in' / 'empty'}: identity folder holds no images"):
        folder_to_rec(tmp_path / "in", tmp_path / "out", progress=False)


def test_cli_from_folder(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    result = subprocess.run(
        [sys.executable, "tools/convert_rec.py", "from-folder", str(tmp_path / "in"), str(tmp_path / "out"),
         "--quality", "80", "--image-size", "64"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "6 images of 3 identities" in result.stdout
    assert "6/6 images" in result.stderr
    assert (tmp_path / "out" / "property").read_text() == "3,64,64\n"


def test_make_demo_data_tool(tmp_path: Path) -> None:
    command = [sys.executable, "tools/make_demo_data.py", "--out", str(tmp_path / "demo"),
               "--identities", "3", "--images", "2", "--heldout", "2", "--pairs", "4"]  # fmt: skip
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    assert "wrote" in first.stdout
    assert (tmp_path / "demo" / "property").read_text() == "3,112,112\n"
    with RecordIOReader(tmp_path / "demo" / "train.rec", tmp_path / "demo" / "train.idx") as reader:
        assert len(FaceRecordIndex(reader)) == 6
    with open(tmp_path / "demo" / "heldout.bin", "rb") as pack:
        images, issame = pickle.load(pack)
    assert len(images) == 8 and sorted(issame) == [False, False, True, True]
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    assert "up to date" in second.stdout
    assert not [path for path in (tmp_path / "demo").iterdir() if path.name.startswith(".")]
