"""What a face ``.rec`` holds, and (``verify``) whether every record of it is sound.

``inspect_rec`` reads every image record's header and image header on worker processes:
counts, layout, label range, image formats and sizes; each record must pass the loaders'
check (``dataset_checks.check_record``: label range, JPEG/PNG/BMP signature). ``verify=True`` also walks the
``.rec`` frame by frame (records the ``.idx`` does not list included), re-synchronising on
the next sound record after damaged bytes, checks that every ``.idx`` offset is a record
start, and fully decodes every image. Each problem is one line with the file, the record
key and its byte offset, and each damaged record is one problem, however many checks it fails.
An empty dataset is an error, not a report of nothing.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sface_dist.data.dataset_checks import check_record, dataset_rec_path, known_num_classes
from sface_dist.data.errors import BadRecordError
from sface_dist.data.recordio import (
    FaceRecordIndex,
    RecordIOError,
    RecordIOReader,
    SkippedBytes,
    scan_resynchronising,
)
from sface_dist.process_pool import map_chunks
from sface_dist.progress_bar import ProgressBar

_MAX_LISTED = 1000
"""Bad records listed one by one; the count covers all."""


@dataclass
class Inspection:
    """Summary of a face ``.rec``; ``problems`` holds one ``file: key K at offset O: what`` line each."""

    rec_path: Path
    layout: str
    num_records: int
    num_images: int
    num_classes: int | None
    label_min: int | None = None
    label_max: int | None = None
    num_labels_used: int = 0
    formats: collections.Counter[str] = field(default_factory=collections.Counter)
    sizes: collections.Counter[tuple[int, int]] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    num_problems: int = 0
    verified: bool = False

    def describe(self) -> str:
        lines = [
            f"{self.rec_path}: {self.layout} layout, {self.num_records} records, {self.num_images} images",
            f"identities: {self.num_classes if self.num_classes is not None else 'not stated'}"
            f" (labels used: {self.num_labels_used}, range {self.label_min}..{self.label_max})",
            "formats: " + ", ".join(f"{name} {count}" for name, count in self.formats.most_common()),
            "image sizes (HxW): "
            + ", ".join(f"{h}x{w} {count}" for (h, w), count in self.sizes.most_common(10))
            + (f", ... {len(self.sizes) - 10} more" if len(self.sizes) > 10 else ""),
        ]
        checked = "framing, offsets and full decode" if self.verified else "headers"
        lines.append(f"checked {checked}: {self.num_problems} problems")
        lines += [f"  {problem}" for problem in self.problems]
        if self.num_problems > len(self.problems):
            lines.append(f"  ... and {self.num_problems - len(self.problems)} more")
        return "\n".join(lines)


def inspect_rec(
    dataset: str | os.PathLike[str], verify: bool = False, progress: bool = True, workers: int | None = None
) -> Inspection:
    """Inspect ``dataset``: its folder or its ``.rec`` (the ``.idx`` alongside); ``verify`` decodes and re-frames
    everything.

    Raises ``RecordIOError`` for a dataset without image records.
    """
    rec_path = dataset_rec_path(dataset)
    idx_path = rec_path.with_suffix(".idx")
    with RecordIOReader(rec_path, idx_path) as reader:
        index = FaceRecordIndex(reader)
        index.require_images()
        num_classes = known_num_classes(index)
        report = Inspection(rec_path, index.layout, len(reader), len(index), num_classes, verified=verify)
        reported = _verify_framing(reader, report) if verify else set()
        ranges = [(start, min(start + 256, len(index))) for start in range(0, len(index), 256)]
        labels_used: set[int] = set()
        results = map_chunks(_inspect_range, ranges, (str(rec_path), str(idx_path), num_classes, verify), workers)
        bar = ProgressBar(len(index), stream=sys.stderr if progress else None)
        for (start, stop), chunk in zip(ranges, results, strict=True):
            bar.update(stop - start)
            labels_used.update(chunk.labels)
            report.formats.update(chunk.formats)
            report.sizes.update(chunk.sizes)
            _add_problems(report, [problem for key, problem in chunk.problems if key not in reported])
        bar.close()
    if labels_used:
        report.label_min, report.label_max = min(labels_used), max(labels_used)
    report.num_labels_used = len(labels_used)
    return report


@dataclass
class _RangeStats:
    labels: set[int] = field(default_factory=set)
    formats: collections.Counter[str] = field(default_factory=collections.Counter)
    sizes: collections.Counter[tuple[int, int]] = field(default_factory=collections.Counter)
    problems: list[tuple[int, str]] = field(default_factory=list)
    """``(key, problem)`` pairs."""


def _inspect_range(
    ranges: Sequence[tuple[int, int]], rec_path: str, idx_path: str, num_classes: int | None, verify: bool
) -> list[_RangeStats]:
    """Per range of image positions: labels, formats, sizes and problems (runs in a worker process)."""
    index = _open(rec_path, idx_path)
    results = []
    for start, stop in ranges:
        stats = _RangeStats()
        for position in range(start, stop):
            key = index.key(position)
            try:
                label, image = index.read(position)
            except RecordIOError as error:
                stats.problems.append((key, str(error)))
                continue
            stats.labels.add(label)
            try:
                check_record(index, position, label, image, num_classes)
            except BadRecordError as error:
                stats.problems.append((key, str(error)))
                continue
            try:
                with Image.open(io.BytesIO(image)) as opened:
                    stats.formats[opened.format or "unknown"] += 1
                    stats.sizes[(opened.height, opened.width)] += 1
                    if verify:
                        opened.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                message = f"{index.reader.location(key)}: image of {len(image)} bytes does not decode ({error})"
                stats.problems.append((key, message))
        results.append(stats)
    return results


@functools.lru_cache(maxsize=2)
def _open(rec_path: str, idx_path: str) -> FaceRecordIndex:
    return FaceRecordIndex(RecordIOReader(rec_path, idx_path))


def _verify_framing(reader: RecordIOReader, report: Inspection) -> set[int]:
    """Walk every frame of the ``.rec``; every ``.idx`` offset must be one of the record starts.

    Each stretch of damaged bytes is one problem, named after the indexed record it begins in;
    an ``.idx`` offset outside every such stretch that is no record start is one more. Returns
    the keys named, so that their own reads do not report the same damage again.
    """
    starts: list[int] = []
    damaged: list[SkippedBytes] = []
    for item in scan_resynchronising(reader.rec_path):
        if isinstance(item, SkippedBytes):
            damaged.append(item)
        else:
            starts.append(item.offset)
    keys, offsets = reader.key_array, reader.offset_array
    by_offset = np.argsort(offsets, kind="stable")
    sorted_offsets = offsets[by_offset]
    problems: dict[int, tuple[int, str]] = {}
    unindexed: list[str] = []
    for span in damaged:
        if span.resume < reader.file_size:
            what = f"{span.error}; skipped {span.resume - span.offset} bytes to the next record, at byte {span.resume}"
        else:
            what = f"{span.error}; no record follows (skipped the last {span.resume - span.offset} bytes)"
        found = int(np.searchsorted(sorted_offsets, span.offset, side="right")) - 1
        if found < 0:
            unindexed.append(f"{reader.rec_path}: offset {span.offset}: {what}")
            continue
        key, offset = int(keys[by_offset[found]]), int(sorted_offsets[found])
        problems.setdefault(key, (offset, f"{reader.rec_path}: key {key} at offset {offset}: {what}"))
    # The damaged stretch starting last at or before each offset; the -1 sentinel makes "none" never contain it.
    stretch = np.searchsorted([span.offset for span in damaged], offsets, side="right") - 1
    in_damage = offsets < np.asarray([span.resume for span in damaged] + [-1], dtype=np.int64)[stretch]
    for i in np.flatnonzero(~np.isin(offsets, np.asarray(starts, dtype=np.int64)) & ~in_damage):
        key = int(keys[i])
        problems.setdefault(key, (int(offsets[i]), f"{reader.location(key)}: not the start of a record"))
    for i in _repeated_offsets(offsets):
        key = int(keys[i])
        same = int(keys[by_offset[int(np.searchsorted(sorted_offsets, offsets[i]))]])
        problems.setdefault(key, (int(offsets[i]), f"{reader.location(key)}: the same record as key {same} (the "
                                                   ".idx names one offset for several keys)"))
    _add_problems(report, unindexed + [problem for _, problem in sorted(problems.values())])
    return set(problems)


def _repeated_offsets(offsets: np.ndarray) -> np.ndarray:
    """Positions of the ``.idx`` entries whose offset an earlier entry (in offset order, then file order) names."""
    order = np.argsort(offsets, kind="stable")
    repeated = np.zeros(len(offsets), dtype=bool)
    repeated[order[1:]] = offsets[order[1:]] == offsets[order[:-1]]
    return np.flatnonzero(repeated)


def _add_problems(report: Inspection, problems: list[str]) -> None:
    report.num_problems += len(problems)
    report.problems += problems[: max(0, _MAX_LISTED - len(report.problems))]
