"""Convert a folder of identity sub-folders into an insightface-layout RecordIO dataset.

``folder_to_rec`` writes ``train.rec``/``train.idx`` (record 0: labels ``(first identity
key, end key)``; images: keys ``1..n``; identity records: their ``[start, end)`` image key
range), ``property`` (``num_classes,H,W``) and ``classes.txt`` (folder name of each label).
Outputs are written under temporary names and renamed into place at the end, so a failed
or interrupted run leaves an existing dataset untouched.
"""

from __future__ import annotations

import collections
import io
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from sface_dist.data.recordio import IRHeader, RecordIOWriter, pack

_MAX_EXACT_KEY = 2**24
"""Record 0 stores key ranges as float32 labels, exact only up to 2**24."""
_OUTPUTS = ("train.rec", "train.idx", "property", "classes.txt")


class ConvertError(ValueError):
    """An input folder tree that cannot be converted as it is."""


@dataclass(frozen=True)
class ConvertSummary:
    """What ``folder_to_rec`` wrote."""

    out_dir: Path
    num_classes: int
    num_images: int
    rec_bytes: int
    seconds: float


def folder_to_rec(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quality: int = 95,
    image_size: int = 112,
    progress: bool = True,
    workers: int | None = None,
) -> ConvertSummary:
    """Encode ``root/<identity>/<image>`` as ``out_dir/train.rec`` and friends.

    Identities are the sub-folders of ``root`` in sorted order (labels ``0..N-1``); their
    images (any format PIL opens) are converted to RGB, resized to ``image_size`` square
    when they are not already, and JPEG-encoded at ``quality`` on ``workers`` threads
    (default: one per CPU). ``progress`` draws a progress bar on stderr.
    """
    start_time = time.perf_counter()
    root, out_dir = Path(root), Path(out_dir)
    identities = _list_identities(root)
    num_images = sum(len(images) for _, images in identities)
    end_key = num_images + 1 + len(identities)
    if end_key > _MAX_EXACT_KEY:
        raise ConvertError(
            f"{root}: {num_images} images and {len(identities)} identities exceed the {_MAX_EXACT_KEY} keys "
            "that insightface's float32 header record can address exactly"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = {name: out_dir / f".{name}.tmp{os.getpid()}" for name in _OUTPUTS}
    try:
        with RecordIOWriter(temporary["train.rec"], temporary["train.idx"]) as writer:
            first_identity_key = num_images + 1
            writer.write(0, pack(IRHeader(0, (float(first_identity_key), float(end_key)), 0, 0), b""))
            labelled = [(label, path) for label, (_, images) in enumerate(identities) for path in images]
            bar = _ProgressBar(num_images, sys.stderr if progress else None)
            encoded = _encode_all([path for _, path in labelled], quality, image_size, workers)
            for key, ((label, _), jpeg) in enumerate(zip(labelled, encoded), start=1):
                writer.write(key, pack(IRHeader(0, float(label), key, 0), jpeg))
                bar.advance()
            bar.close()
            start = 1
            for label, (_, images) in enumerate(identities):
                end = start + len(images)
                writer.write(first_identity_key + label, pack(IRHeader(0, (float(start), float(end)), 0, 0), b""))
                start = end
        temporary["property"].write_text(f"{len(identities)},{image_size},{image_size}\n")
        temporary["classes.txt"].write_text("".join(f"{name}\n" for name, _ in identities), encoding="utf-8")
        for name, path in temporary.items():
            os.replace(path, out_dir / name)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return ConvertSummary(
        out_dir=out_dir,
        num_classes=len(identities),
        num_images=num_images,
        rec_bytes=(out_dir / "train.rec").stat().st_size,
        seconds=time.perf_counter() - start_time,
    )


def encode_jpeg(image: np.ndarray | Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes of an RGB image (``uint8 [H, W, 3]`` array or PIL image)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _load_and_encode(path: Path, quality: int, image_size: int) -> bytes:
    """Read any image PIL opens, as an ``image_size`` square RGB JPEG."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ConvertError(f"{path}: cannot read image ({error})") from None
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return encode_jpeg(image, quality)


def _encode_all(paths: list[Path], quality: int, image_size: int, workers: int | None) -> Iterator[bytes]:
    """JPEG bytes of ``paths`` in order, encoded on a thread pool (PIL releases the GIL).

    At most a few batches are in flight, so memory stays flat on datasets of any size.
    """
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque[Future[bytes]] = collections.deque()
        for path in paths:
            pending.append(pool.submit(_load_and_encode, path, quality, image_size))
            if len(pending) >= 16 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _list_identities(root: Path) -> list[tuple[str, list[Path]]]:
    """Sorted identity folders of ``root`` with their sorted image files."""
    if not root.is_dir():
        raise ConvertError(f"{root}: not a directory")
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    identities = []
    for folder in sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")):
        images = sorted(
            entry
            for entry in folder.iterdir()
            if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in extensions
        )
        if not images:
            raise ConvertError(f"{folder}: identity folder holds no images")
        identities.append((folder.name, images))
    if not identities:
        raise ConvertError(f"{root}: no identity sub-folders")
    return identities


class _ProgressBar:
    """A one-line ``\\r`` progress bar (count, rate, ETA), redrawn at most 5 times a second."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self._total = total
        self._stream = stream
        self._done = 0
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def advance(self) -> None:
        self._done += 1
        now = time.perf_counter()
        if self._stream is not None and now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw(self._stream, now)

    def close(self) -> None:
        if self._stream is not None:
            self._draw(self._stream, time.perf_counter())
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, stream: TextIO, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self._done / elapsed
        eta = (self._total - self._done) / rate if rate > 0 else 0.0
        width = 30
        filled = width * self._done // max(self._total, 1)
        stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self._done}/{self._total} images"
            f"  {rate:,.0f} img/s  ETA {int(eta) // 60:d}:{int(eta) % 60:02d}"
        )
        stream.flush()
