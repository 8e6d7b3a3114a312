"""Datasets of PNG images with bad records where a test puts them, the one line that names such a record, and
training runs (``python -m sface_dist.train``, one rank or two torchrun ranks) that meet one.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from sface_dist.data.recordio import IRHeader, RecordIOReader, RecordIOWriter, header_record, pack
from sface_dist.data.sampler import EpochShardSampler

from training_runs import ROOT

NUM_CLASSES = 4
SMALL = 8
"""Image side of the in-process datasets; training runs use 112, what the tiny backbone takes."""


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


def location(rec: Path, key: int) -> str:
    return f"{rec}: key {key} at offset {offset_of(rec, key)}"


class TrainingRun(NamedTuple):
    process: subprocess.Popen[str]
    rec: Path
    bad_keys: dict[int, int]
    """The key of the bad record in the last rank's first batch."""


def first_batch(num_images: int, rank: int, world_size: int) -> list[int]:
    """Image indices of ``rank``'s first batch of 4 in a run seeded 0."""
    sampler = EpochShardSampler(num_images, 4, rank, world_size, seed=0, flip=True)
    return [sample.image_index for sample in next(sampler.batches(0, 0))]


def start_training(folder: Path, workers: int, world_size: int) -> TrainingRun:
    """Train on 4 images per rank, the second of the last rank's first batch a truncated PNG."""
    num_images = 4 * world_size
    last = world_size - 1
    bad = {last: first_batch(num_images, last, world_size)[1]}
    rec = write_dataset(folder, num_images, size=112, payloads={i: png(i, 112)[:60] for i in bad.values()})
    config = folder / "run.yaml"
    config.write_text(
        f"data: {{backend: torch, root: {folder}, batch_size: 4, num_workers: {workers}}}\n"
        f"model: {{backbone: tiny, embedding_size: 16}}\ntrain: {{output: {folder / 'run'}, steps: 2, seed: 0}}\n"
    )
    command = [sys.executable, "-m", "sface_dist.train", str(config)]
    if world_size > 1:  # each rank's output in LOG_DIR/<run id>/attempt_0/<rank>/stderr.log
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
        command[1:1] = [*launch, f"--log-dir={folder / 'logs'}", "--redirects=3"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return TrainingRun(process, rec, {rank: index + 1 for rank, index in bad.items()})


@contextmanager
def started_runs(
    tmp_path_factory: pytest.TempPathFactory, setups: dict[str, tuple[int, int]]
) -> Iterator[dict[str, TrainingRun]]:
    """The training runs of ``setups`` (name: DataLoader workers, ranks), started together: each takes a few
    seconds, mostly imports. They are killed on leaving."""
    runs = {name: start_training(tmp_path_factory.mktemp("train"), *setup) for name, setup in setups.items()}
    try:
        yield runs
    finally:
        for run in runs.values():
            run.process.kill()
            run.process.communicate()


def assert_one_error_line(stderr: str, rec: Path, key: int) -> None:
    """``stderr`` has exactly one ``error:`` line, naming ``rec``, ``key`` and its offset, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert re.fullmatch(rf"error: {re.escape(location(rec, key))}: cannot decode image \(.+\)", errors[0]), stderr
