"""Every bad input is one line naming the file, key and offset: training (any worker and rank count), skip mode,
non-whole labels, and ``inspect --verify`` on damaged or empty datasets."""

from __future__ import annotations

import gc
import math
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sface_dist.config import DataConfig
from sface_dist.data.convert import rec_to_folder, repack
from sface_dist.data.errors import DataError
from sface_dist.data.inspection import inspect_rec
from sface_dist.data.loader import build_loader
from sface_dist.data.recordio import RecordIOError
from sface_dist.data.sampler import EpochShardSampler

from damaged_datasets import (
    NUM_CLASSES,
    SMALL,
    TrainingRun,
    assert_one_error_line,
    location,
    offset_of,
    png,
    started_runs,
    write_dataset,
)

ROOT = Path(__file__).resolve().parents[2]


def overwrite(rec: Path, at: int, data: bytes) -> None:
    content = bytearray(rec.read_bytes())
    content[at : at + len(data)] = data
    rec.write_bytes(bytes(content))


def loader_config(rec: Path, setup: str, **overrides: object) -> DataConfig:
    """``setup``: ``torch-N`` (N DataLoader workers) or ``dali``."""
    backend, _, workers = setup.partition("-")
    values: dict[str, object] = dict(
        root=str(rec.parent), image_size=SMALL, batch_size=6, num_workers=int(workers or 1), backend=backend
    )
    return DataConfig(**(values | overrides))  # type: ignore[arg-type]


def first_error(cfg: DataConfig) -> str:
    """The message of the ``DataError`` that the first epoch of rank 0 of 1 raises.

    The loader is freed before returning: a DALI pipeline kept alive by the traceback keeps its
    threads, and DataLoader workers forked next to running threads can deadlock.
    """
    loader = build_loader(cfg, 0, 1, seed=0)
    with pytest.raises(DataError) as caught:
        list(loader)
    message = str(caught.value)
    del loader, caught
    gc.collect()
    return message


# Each bad record of image 2 (key 3): how to make it, and what its one line says after "FILE: key 3 at offset O: ".
BAD_RECORDS = {
    "bad magic": (lambda rec: overwrite(rec, offset_of(rec, 3), b"\xde\xad\xbe\xef"), r"bad magic 0xefbeadde at byte"),
    "truncated": (
        lambda rec: overwrite(rec, offset_of(rec, 3) + 4, struct.pack("<I", 1 << 28)),
        r"truncated record: needs 268435456 bytes",
    ),
    "undecodable": (lambda rec: write_dataset(rec.parent, 6, payloads={2: png(2, SMALL)[:40]}), "cannot decode image"),
    "label out of range": (lambda rec: write_dataset(rec.parent, 6, labels={2: 4.0}), r"label 4 outside \[0, 4\)"),
    "label 3.5": (lambda rec: write_dataset(rec.parent, 6, labels={2: 3.5}), "label 3.5 is not a whole number"),
    "label nan": (lambda rec: write_dataset(rec.parent, 6, labels={2: math.nan}), "label nan is not a whole number"),
    "label inf": (lambda rec: write_dataset(rec.parent, 6, labels={2: math.inf}), "label inf is not a whole number"),
}


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_error_mode_raises_one_line_naming_the_record(tmp_path: Path, kind: str) -> None:
    """Whatever is wrong with the record and wherever it is read: main process, DataLoader workers, DALI's source."""
    rec = write_dataset(tmp_path, 6)
    damage, problem = BAD_RECORDS[kind]
    damage(rec)
    for setup in ("torch-0", "torch-1", "torch-2", "dali"):
        message = first_error(loader_config(rec, setup))
        assert re.fullmatch(rf"{re.escape(location(rec, 3))}: {problem}[^\n]*", message), f"{setup}: {message}"


@pytest.mark.parametrize("setup", ["torch-0", "torch-2", "dali"])
def test_skip_mode_batch_of_only_bad_records_is_one_line(tmp_path: Path, setup: str) -> None:
    """The message names the batch's first bad record and says that the whole batch was bad."""
    payloads = {i: b"not an image" for i in range(6)}
    rec = write_dataset(tmp_path, 6, payloads=payloads)
    cfg = loader_config(rec, setup, on_bad_record="skip")
    first_key = next(EpochShardSampler(6, 6, 0, 1, seed=0, flip=True).batches(0, 0))[0].image_index + 1
    message = first_error(cfg)
    assert message == (
        f"{location(rec, first_key)}: payload of 12 bytes is not a JPEG, PNG or BMP; every image of this batch "
        "of 6 was a bad record, so data.on_bad_record=skip has nothing to train on"
    )


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
    assert result.returncode == 1
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
    assert result.returncode == 1 and result.stdout == ""
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


# A training run on two torchrun ranks, on 112x112 images.


@pytest.fixture(scope="module")
def bad_record_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TrainingRun]]:
    with started_runs(tmp_path_factory, {"2 ranks, 1 worker each": (1, 2)}) as runs:
        yield runs


def test_training_on_two_ranks_stops_every_rank_with_one_line(bad_record_runs: dict[str, TrainingRun]) -> None:
    """Rank 1 meets the bad record and says so in one line; rank 0 stops with it, silently, instead of failing in
    a collective rank 1 never joins. torchrun's own report of the failed ranks is not the trainer's output."""
    run = bad_record_runs["2 ranks, 1 worker each"]
    run.process.communicate(timeout=240)
    assert run.process.returncode != 0
    (log,) = (run.rec.parent / "logs").glob("*/attempt_0/1/stderr.log")
    assert_one_error_line(log.read_text(), run.rec, run.bad_keys[1])
    (log,) = (run.rec.parent / "logs").glob("*/attempt_0/0/stderr.log")
    assert "Traceback" not in log.read_text() and "error" not in log.read_text(), log.read_text()
