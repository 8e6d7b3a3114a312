"""``folder_to_rec`` and its CLI on a tiny generated folder tree."""

from __future__ import annotations

import io
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sface_dist.data.bin_pack import read_bin
from sface_dist.data.convert import EncodeOptions, folder_to_rec, rec_to_folder, repack
from sface_dist.data.dataset_edits import add_label_noise, hold_out_identities
from sface_dist.data.errors import BadRecordError, ConvertError, DataError
from sface_dist.data.images import encode_jpeg
from sface_dist.data.inspection import inspect_rec
from sface_dist.data.recordio import (
    FaceRecordIndex,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    pack,
    unpack,
)

REPO = Path(__file__).resolve().parents[2]
COUNTS = {"alice": 3, "bob": 1, "carol": 2}
_DATASET_FILES = ["classes.txt", "property", "train.idx", "train.rec"]


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


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "tools/convert_rec.py", *args], cwd=REPO, capture_output=True, text=True, check=check
    )


def images_by_label(rec: Path) -> list[tuple[int, bytes]]:
    with RecordIOReader(rec, rec.with_suffix(".idx")) as reader:
        index = FaceRecordIndex(reader)
        return sorted(index.read(i) for i in range(len(index)))


def test_shuffle_writes_a_seeded_flat_file(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path / "ordered", progress=False)
    folder_to_rec(tmp_path / "in", tmp_path / "a", shuffle=True, seed=1, progress=False)
    folder_to_rec(tmp_path / "in", tmp_path / "b", shuffle=True, seed=1, progress=False, workers=0)
    assert (tmp_path / "a" / "train.rec").read_bytes() == (tmp_path / "b" / "train.rec").read_bytes()
    with RecordIOReader(tmp_path / "a" / "train.rec", tmp_path / "a" / "train.idx") as reader:
        index = FaceRecordIndex(reader)
        assert (index.layout, reader.keys) == ("flat", [0, 1, 2, 3, 4, 5])
        assert [index.read(i)[0] for i in range(6)] != [0, 0, 0, 1, 2, 2]
    assert images_by_label(tmp_path / "a" / "train.rec") == images_by_label(tmp_path / "ordered" / "train.rec")
    assert (tmp_path / "a" / "classes.txt").read_text().split() == ["alice", "bob", "carol"]


def test_pass_through_keeps_jpeg_bytes_and_size_zero_keeps_sizes(tmp_path: Path) -> None:
    jpeg = encode_jpeg(np.full((112, 112, 3), 90, np.uint8), quality=70)
    (tmp_path / "in" / "x").mkdir(parents=True)
    (tmp_path / "in" / "x" / "a.jpg").write_bytes(jpeg)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "in" / "x" / "b.png")
    folder_to_rec(tmp_path / "in", tmp_path / "out", EncodeOptions(pass_through=True), progress=False)
    stored = [image for _, image in images_by_label(tmp_path / "out" / "train.rec")]
    assert jpeg in stored and all(image.startswith(b"\xff\xd8") for image in stored)
    folder_to_rec(tmp_path / "in", tmp_path / "kept", EncodeOptions(image_size=None), progress=False)
    kept = images_by_label(tmp_path / "kept" / "train.rec")
    sizes = sorted(Image.open(io.BytesIO(image)).size for _, image in kept)
    assert sizes == [(40, 30), (112, 112)]
    assert (tmp_path / "kept" / "property").read_text() == "1,112,112\n"


def test_from_list_follows_im2rec(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    (tmp_path / "train.lst").write_text("7\t2\tcarol/0.png\n3\t0\talice/1.jpg\n5\t1\t4.5\tbob/0.png\n")
    result = run_cli("from-list", str(tmp_path / "train.lst"), str(tmp_path / "in"), str(tmp_path / "out"), "--quiet")
    assert "3 images of 3 identities" in result.stdout
    with RecordIOReader(tmp_path / "out" / "train.rec", tmp_path / "out" / "train.idx") as reader:
        assert reader.keys == [7, 3, 5]
        headers = [unpack(reader.read(key))[0] for key in (7, 3, 5)]
    assert [(h.flag, h.label, h.id) for h in headers] == [(0, 2.0, 7), (0, 0.0, 3), (2, (1.0, 4.5), 5)]
    assert (tmp_path / "out" / "property").read_text() == "3,112,112\n"
    (tmp_path / "bad.lst").write_text("1\t0\talice/0.png\nnot a line\n")
    failed = run_cli("from-list", str(tmp_path / "bad.lst"), str(tmp_path / "in"), str(tmp_path / "out"), check=False)
    assert failed.returncode == 1
    assert f"{tmp_path / 'bad.lst'}: line 2 is not 'index<TAB>label<TAB>path'" in failed.stderr


def test_to_folder_round_trip_into_an_empty_folder(tmp_path: Path) -> None:
    """An existing empty folder is filled (one that holds anything is refused: tests/unit/test_hostile_inputs.py)."""
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path / "rec", progress=False)
    (tmp_path / "out").mkdir()
    result = run_cli("to-folder", str(tmp_path / "rec" / "train.rec"), str(tmp_path / "out"))
    assert "6 images of 3 identities" in result.stdout
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["alice", "bob", "carol"]
    assert sorted(path.name for path in (tmp_path / "out" / "alice").iterdir()) == ["1.jpg", "2.jpg", "3.jpg"]
    names = ["alice", "bob", "carol"]
    extracted = sorted((names.index(path.parent.name), path.read_bytes()) for path in (tmp_path / "out").rglob("*.jpg"))
    assert extracted == images_by_label(tmp_path / "rec" / "train.rec")
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def corrupt_dataset(root: Path) -> tuple[Path, dict[int, str]]:
    """A 6-image insightface dataset with a non-image payload (key 2), a label out of range (key 4)
    and a broken JPEG (key 5): the problems ``inspect --verify`` and ``repack`` must report."""
    make_tree(root / "in")
    folder_to_rec(root / "in", root, progress=False)
    with RecordIOReader(root / "train.rec", root / "train.idx") as reader:
        records = {key: reader.read(key) for key in reader.keys}
    records[2] = pack(IRHeader(0, 0.0, 2, 0), b"garbage!")
    records[4] = pack(IRHeader(0, 9.0, 4, 0), unpack(records[4])[1])
    records[5] = pack(IRHeader(0, 2.0, 5, 0), unpack(records[5])[1][:300])
    with RecordIOWriter(root / "train.rec", root / "train.idx") as writer:
        for key, record in records.items():
            writer.write(key, record)
    with RecordIOReader(root / "train.rec", root / "train.idx") as reader:
        offsets = {key: reader.offset(key) for key in (2, 4, 5)}
    rec = root / "train.rec"
    return rec, {
        2: f"{rec}: key 2 at offset {offsets[2]}: ",
        4: f"{rec}: key 4 at offset {offsets[4]}: label 9 outside [0, 3)",
        5: f"{rec}: key 5 at offset {offsets[5]}: image of ",
    }


def test_inspect_and_verify(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path / "good", progress=False)
    report = inspect_rec(tmp_path / "good" / "train.rec", verify=True, progress=False, workers=0)
    assert (report.layout, report.num_records, report.num_images, report.num_classes) == ("insightface", 10, 6, 3)
    assert (report.label_min, report.label_max, report.num_problems) == (0, 2, 0)
    assert report.sizes == {(112, 112): 6} and report.formats == {"JPEG": 6}

    rec, problems = corrupt_dataset(tmp_path / "bad")
    result = run_cli("inspect", str(rec), "--verify", "--quiet", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 problems" in result.stdout
    for message in problems.values():
        assert message in result.stdout
    assert "problems" in run_cli("inspect", str(rec), "--quiet", check=False).stdout


def test_verify_reports_broken_framing_and_stray_offsets(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path, progress=False)
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    lines = idx.read_text().splitlines()
    key, offset = lines[3].split("\t")
    lines[3] = f"{key}\t{int(offset) + 4}"
    idx.write_text("\n".join(lines) + "\n")
    data = bytearray(rec.read_bytes())
    last = int(lines[-1].split("\t")[1])
    data[last : last + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    report = inspect_rec(rec, verify=True, progress=False, workers=0)
    assert report.num_problems == 2, report.problems  # one line per record, not one per check it fails
    assert report.problems[0] == f"{rec}: key {key} at offset {int(offset) + 4}: not the start of a record"
    assert report.problems[1].startswith(f"{rec}: key 9 at offset {last}: bad magic 0x00000000 at byte {last}")


def test_repack_is_flat_shuffled_and_complete(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path / "src", progress=False)
    result = run_cli("repack", str(tmp_path / "src" / "train.rec"), str(tmp_path / "flat"), "--seed", "3")
    assert "6 images of 3 identities" in result.stdout
    with RecordIOReader(tmp_path / "flat" / "train.rec", tmp_path / "flat" / "train.idx") as reader:
        assert reader.keys == list(range(6))
        headers = [unpack(reader.read(key))[0] for key in range(6)]
    assert all(h.flag == 0 and h.id == key for key, h in enumerate(headers))
    assert [int(h.label) for h in headers] != [0, 0, 0, 1, 2, 2]
    assert images_by_label(tmp_path / "flat" / "train.rec") == images_by_label(tmp_path / "src" / "train.rec")
    assert (tmp_path / "flat" / "property").read_text() == "3,112,112\n"
    assert (tmp_path / "flat" / "classes.txt").read_text() == (tmp_path / "src" / "classes.txt").read_text()


def test_repack_bad_records_error_or_skip_and_keep_existing_output(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path / "src", progress=False)
    repack(tmp_path / "src" / "train.rec", tmp_path / "flat", progress=False)
    before = (tmp_path / "flat" / "train.rec").read_bytes()
    rec, problems = corrupt_dataset(tmp_path / "bad")
    with pytest.raises(BadRecordError, match=rf"{rec}: key \d at offset \d+: "):
        repack(rec, tmp_path / "flat", progress=False)
    assert (tmp_path / "flat" / "train.rec").read_bytes() == before
    assert sorted(path.name for path in (tmp_path / "flat").iterdir()) == _DATASET_FILES
    summary = repack(rec, tmp_path / "flat", skip_bad=True, progress=False)
    assert summary.num_images == 4 and len(summary.skipped) == 2  # the broken JPEG is copied: bytes are not decoded
    assert any(problems[2] in line for line in summary.skipped) and any(problems[4] in line for line in summary.skipped)


def test_make_bin_from_pairs(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    (tmp_path / "pairs.txt").write_text("# a comment\nalice/0.png alice/1.jpg 1\n\nalice/0.png bob/0.png false\n")
    result = run_cli("make-bin", str(tmp_path / "pairs.txt"), str(tmp_path / "in"), str(tmp_path / "v.bin"))
    assert "2 pairs" in result.stdout
    pack_ = read_bin(tmp_path / "v.bin", image_size=112)
    assert pack_.images.shape == (4, 3, 112, 112) and pack_.issame.tolist() == [True, False]
    (tmp_path / "bad.txt").write_text("alice/0.png alice/1.jpg maybe\n")
    failed = run_cli("make-bin", str(tmp_path / "bad.txt"), str(tmp_path / "in"), str(tmp_path / "v.bin"), check=False)
    assert failed.returncode == 1 and "line 1 is not 'path_a path_b 1|0'" in failed.stderr
    assert read_bin(tmp_path / "v.bin").issame.tolist() == [True, False]


def test_reindex_cli(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path, progress=False)
    original = (tmp_path / "train.idx").read_bytes()
    (tmp_path / "train.idx").unlink()
    with pytest.raises(RecordIOError, match="reindex"):
        RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    assert "10 records" in run_cli("reindex", str(tmp_path / "train.rec")).stdout
    assert (tmp_path / "train.idx").read_bytes() == original


def test_every_subcommand_has_help() -> None:
    for command in ("from-folder", "from-list", "to-folder", "inspect", "repack", "make-bin", "reindex"):
        assert "usage:" in run_cli(command, "--help").stdout


def test_repack_exclude_leaves_out_the_listed_records(tmp_path: Path) -> None:
    """A finder's CSV (header, key first) or a plain key list: exactly the listed images are left out."""
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path / "src", progress=False)
    source = tmp_path / "src" / "train.rec"
    with RecordIOReader(source, source.with_suffix(".idx")) as reader:
        keys = FaceRecordIndex(reader).image_keys.tolist()
        record = {key: unpack(reader.read(key)) for key in keys}
    excluded = [keys[1], keys[4]]
    listing = tmp_path / "suspects.csv"
    listing.write_text("key,label,score\n" + "".join(f"{k},{int(record[k][0].label)},0.1\n" for k in excluded))
    result = run_cli("repack", str(source), str(tmp_path / "clean"), "--exclude", str(listing))
    assert "4 images of 3 identities" in result.stdout and "excluded 2 listed records" in result.stdout
    kept = sorted((int(record[k][0].label), record[k][1]) for k in keys if k not in excluded)
    assert images_by_label(tmp_path / "clean" / "train.rec") == kept

    (tmp_path / "keys.txt").write_text(f"# suspects\n{keys[0]}\n\n{10_000}\n{10_001}\n")
    failed = run_cli("repack", str(source), str(tmp_path / "clean"), "--exclude", str(tmp_path / "keys.txt"),
                     check=False)
    assert failed.returncode == 1
    assert failed.stderr == f"error: {tmp_path / 'keys.txt'}: 2 keys are not image records of {source}: 10000, 10001\n"
    assert images_by_label(tmp_path / "clean" / "train.rec") == kept
    (tmp_path / "bad.txt").write_text("key\nseven\n")
    failed = run_cli("repack", str(source), str(tmp_path / "clean"), "--exclude", str(tmp_path / "bad.txt"),
                     check=False)
    assert failed.stderr == f"error: {tmp_path / 'bad.txt'}: line 2: 'seven' is not a record key\n"


def records(rec: Path) -> dict[int, tuple[int, bytes]]:
    """Key -> (label, image bytes) of every image record."""
    with RecordIOReader(rec, rec.with_suffix(".idx")) as reader:
        index = FaceRecordIndex(reader)
        return {index.key(i): index.read(i) for i in range(len(index))}


def test_label_noise_is_exactly_what_its_manifest_says(tmp_path: Path) -> None:
    """Every image of the noisy copy is a source image; its label is the source's unless the manifest lists it,
    and a listed one is another identity's label (closed) or an outside image given a label of the set (open)."""
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path / "src", progress=False)
    other_tree = tmp_path / "other"
    make_tree(other_tree)
    folder_to_rec(other_tree, tmp_path / "outside", progress=False, options=EncodeOptions(quality=50))
    source, outside = tmp_path / "src" / "train.rec", tmp_path / "outside" / "train.rec"

    corrupted = add_label_noise(source, tmp_path / "noisy", closed_fraction=0.5, open_fraction=0.5, outside=outside,
                                seed=4, progress=False)
    clean, extra, noisy = records(source), records(outside), records(tmp_path / "noisy" / "train.rec")
    assert sorted(noisy) == list(range(9)) and (tmp_path / "noisy" / "property").read_text() == "3,112,112\n"
    by_key = {record.key: record for record in corrupted}
    assert sorted(record.kind for record in corrupted) == ["closed"] * 3 + ["open"] * 3
    clean_images = {image: label for label, image in clean.values()}
    for key, (label, image) in noisy.items():
        if key not in by_key:
            assert clean_images[image] == label
            continue
        record = by_key[key]
        assert record.noisy_label == label
        origin = clean if record.kind == "closed" else extra
        assert origin[record.source_key] == (record.true_label, image)
        if record.kind == "closed":
            assert label != record.true_label and 0 <= label < 3
    assert add_label_noise(source, tmp_path / "again", 0.5, 0.5, outside, seed=4, progress=False) == corrupted
    with pytest.raises(ConvertError, match="open-set noise needs a dataset of other identities"):
        add_label_noise(source, tmp_path / "x", open_fraction=0.2, progress=False)


def test_hold_out_identities_splits_by_label_and_keeps_every_image(tmp_path: Path) -> None:
    make_tree(tmp_path / "in")
    folder_to_rec(tmp_path / "in", tmp_path / "src", progress=False)
    source = records(tmp_path / "src" / "train.rec")
    kept, outside = hold_out_identities(tmp_path / "src" / "train.rec", tmp_path / "split", 1, progress=False)
    assert (kept, outside) == (tmp_path / "split" / "kept" / "train.rec", tmp_path / "split" / "outside" / "train.rec")
    in_order = [source[key] for key in sorted(source)]
    assert list(records(kept).values()) == [entry for entry in in_order if entry[0] < 2]
    assert list(records(outside).values()) == [(label - 2, image) for label, image in in_order if label == 2]
    assert sorted(records(kept)) == list(range(4)) and sorted(records(outside)) == list(range(2))
    assert kept.with_name("property").read_text() == "2,112,112\n"
    assert outside.with_name("property").read_text() == "1,112,112\n"
    for count in (0, 3):
        with pytest.raises(ConvertError, match=f"cannot hold out {count} of its 3 identities"):
            hold_out_identities(tmp_path / "src" / "train.rec", tmp_path / "bad", count, progress=False)
    assert not (tmp_path / "bad" / "kept" / "train.rec").exists()


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_every_dataset_input_takes_the_folder_or_its_rec(tmp_path: Path) -> None:
    """The folder ``from-folder`` writes (and ``data.root`` takes) and its ``train.rec`` name the same dataset."""
    make_tree(tmp_path / "in")
    folder = tmp_path / "src"
    folder_to_rec(tmp_path / "in", folder, progress=False)
    rec = folder / "train.rec"
    for spelling, dataset in (("folder", folder), ("rec", rec)):
        run_cli("to-folder", str(dataset), str(tmp_path / f"images-{spelling}"), "--quiet")
        run_cli("repack", str(dataset), str(tmp_path / f"flat-{spelling}"), "--quiet")
    assert tree_bytes(tmp_path / "images-folder") == tree_bytes(tmp_path / "images-rec")
    assert len(tree_bytes(tmp_path / "images-folder")) == sum(COUNTS.values())
    assert tree_bytes(tmp_path / "flat-folder") == tree_bytes(tmp_path / "flat-rec")
    assert images_by_label(tmp_path / "flat-folder" / "train.rec") == images_by_label(rec)
    inspected = [run_cli("inspect", str(dataset), "--verify", "--quiet").stdout for dataset in (folder, rec)]
    assert inspected[0] == inspected[1] and inspected[0].startswith(f"{rec}: insightface layout, 10 records, 6 images")

    noisy = [add_label_noise(dataset, tmp_path / f"noisy-{i}", 0.5, 0.5, dataset, seed=1, progress=False)
             for i, dataset in enumerate((folder, rec))]  # fmt: skip
    assert noisy[0] == noisy[1] and tree_bytes(tmp_path / "noisy-0") == tree_bytes(tmp_path / "noisy-1")
    split = [hold_out_identities(dataset, tmp_path / f"split-{i}", 1, progress=False)
             for i, dataset in enumerate((folder, rec))]  # fmt: skip
    assert [records(path) for path in split[0]] == [records(path) for path in split[1]]

    original = (folder / "train.idx").read_bytes()
    (folder / "train.idx").unlink()
    assert "10 records" in run_cli("reindex", str(folder), "--quiet").stdout
    assert (folder / "train.idx").read_bytes() == original


def test_a_dataset_that_is_no_folder_with_train_rec_nor_a_rec_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a dataset\n")
    expected = {
        tmp_path / "empty": f"{tmp_path / 'empty'}: the dataset folder holds no train.rec",
        tmp_path / "notes.txt": f"{tmp_path / 'notes.txt'}: expected a dataset folder (holding train.rec, train.idx) "
        "or a .rec file",
    }
    for dataset, message in expected.items():
        for command in (["to-folder", str(dataset), str(tmp_path / "out")], ["inspect", str(dataset)],
                        ["repack", str(dataset), str(tmp_path / "out")], ["reindex", str(dataset)]):  # fmt: skip
            result = run_cli(*command, "--quiet", check=False)
            assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: {message}\n"), command
        for convert in (rec_to_folder, repack):
            with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
                convert(dataset, tmp_path / "out", progress=False)
        with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
            inspect_rec(dataset, progress=False, workers=0)
    assert not (tmp_path / "out").exists()
