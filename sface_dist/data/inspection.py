"""What a face ``.rec`` holds, and (``verify``) whether every record of it is sound.

``inspect_rec`` reads every image record's header and image header on worker processes:
counts, layout, label range, image formats and sizes. ``verify=True`` also walks the
``.rec`` frame by frame (records the ``.idx`` does not list included), checks that every
``.idx`` offset is a record start, and fully decodes every image. Each problem is reported
with the file, the record key and its byte offset.
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

from sface_dist.data.convert import known_num_classes, map_chunks
from sface_dist.data.recordio import FaceRecordIndex, RecordIOError, RecordIOReader, scan_records
from sface_dist.progress import ProgressBar

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
    rec_path: str | os.PathLike[str], verify: bool = False, progress: bool = True, workers: int | None = None
) -> Inspection:
    """Inspect ``rec_path`` (its ``.idx`` alongside); ``verify`` decodes and re-frames everything."""
    rec_path = Path(rec_path)
    idx_path = rec_path.with_suffix(".idx")
    with RecordIOReader(rec_path, idx_path) as reader:
        index = FaceRecordIndex(reader)
        num_classes = known_num_classes(rec_path, index)
        report = Inspection(rec_path, index.layout, len(reader), len(index), num_classes, verified=verify)
        if verify:
            _verify_framing(reader, report)
        ranges = [(start, min(start + 256, len(index))) for start in range(0, len(index), 256)]
        labels_used: set[int] = set()
        results = map_chunks(_inspect_range, ranges, (str(rec_path), str(idx_path), num_classes, verify), workers)
        bar = ProgressBar(len(index), stream=sys.stderr if progress else None)
        for (start, stop), chunk in zip(ranges, results, strict=True):
            bar.update(stop - start)
            labels_used.update(chunk.labels)
            report.formats.update(chunk.formats)
            report.sizes.update(chunk.sizes)
            _add_problems(report, chunk.problems)
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
    problems: list[str] = field(default_factory=list)


def _inspect_range(
    ranges: Sequence[tuple[int, int]], rec_path: str, idx_path: str, num_classes: int | None, verify: bool
) -> list[_RangeStats]:
    """Per range of image positions: labels, formats, sizes and problems (runs in a worker process)."""
    reader, index = _open(rec_path, idx_path)
    results = []
    for start, stop in ranges:
        stats = _RangeStats()
        for position in range(start, stop):
            key = index.key(position)
            try:
                label, image = index.read(position)
            except RecordIOError as error:
                stats.problems.append(str(error))
                continue
            stats.labels.add(label)
            if num_classes is not None and not 0 <= label < num_classes:
                stats.problems.append(f"{reader.location(key)}: label {label} outside [0, {num_classes})")
            try:
                with Image.open(io.BytesIO(image)) as opened:
                    stats.formats[opened.format or "unknown"] += 1
                    stats.sizes[(opened.height, opened.width)] += 1
                    if verify:
                        opened.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                stats.problems.append(f"{reader.location(key)}: image of {len(image)} bytes does not decode ({error})")
        results.append(stats)
    return results


@functools.lru_cache(maxsize=2)
def _open(rec_path: str, idx_path: str) -> tuple[RecordIOReader, FaceRecordIndex]:
    reader = RecordIOReader(rec_path, idx_path)
    return reader, FaceRecordIndex(reader)


def _verify_framing(reader: RecordIOReader, report: Inspection) -> None:
    """Walk every frame of the ``.rec``; every ``.idx`` offset must be one of the record starts."""
    starts = []
    try:
        for scanned in scan_records(reader.rec_path):
            starts.append(scanned.offset)
    except RecordIOError as error:
        _add_problems(report, [f"{error} (the rest of the file was not scanned)"])
    keys, offsets = reader.key_array, reader.offset_array
    stray = np.flatnonzero(~np.isin(offsets, np.asarray(starts, dtype=np.int64)))
    if starts and stray.size:
        _add_problems(
            report,
            [f"{reader.rec_path}: key {keys[i]} at offset {offsets[i]}: not the start of a record" for i in stray],
        )


def _add_problems(report: Inspection, problems: list[str]) -> None:
    report.num_problems += len(problems)
    report.problems += problems[: max(0, _MAX_LISTED - len(report.problems))]
