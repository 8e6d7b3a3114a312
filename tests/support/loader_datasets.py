"""Small insightface-layout datasets whose pixels say which image they are, some with bad records, and the
loader config and epochs the loader tests read them with."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sface_dist.config import DataConfig
from sface_dist.data.images import encode_jpeg
from sface_dist.data.loader import FaceLoader
from sface_dist.data.recordio import IRHeader, RecordIOWriter, header_record, pack

SIZE = 8
NUM_CLASSES = 5


def image_of(index: int) -> np.ndarray:
    """Red encodes the image index, green rises left to right (to see flips), blue is 50."""
    pixels = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., 0] = index
    pixels[..., 1] = np.arange(SIZE) * 30
    pixels[..., 2] = 50
    return pixels


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_rec(
    root: Path, labels: list[int], num_classes: int = NUM_CLASSES, payloads: dict[int, bytes] | None = None
) -> Path:
    """An insightface-layout dataset of lossless PNG images (``payloads`` replaces some image bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    payloads = payloads or {}
    n = len(labels)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as writer:
        writer.write(0, header_record(n + 1, n + 1 + num_classes))
        for index, label in enumerate(labels):
            image = payloads.get(index, png(image_of(index)))
            writer.write(index + 1, pack(IRHeader(0, float(label), index + 1, 0), image))
    (root / "property").write_text(f"{num_classes},{SIZE},{SIZE}\n")
    return root


def config(root: Path, **overrides: object) -> DataConfig:
    values: dict[str, object] = dict(root=str(root), image_size=SIZE, batch_size=4, num_workers=0, backend="torch")
    return DataConfig(**(values | overrides))  # type: ignore[arg-type]


def epoch(loader: FaceLoader, number: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(number, skip)
    return list(loader)


def bad_payload(index: int) -> bytes:
    """The bad image bytes ``bad_dataset`` stores for image ``index``."""
    truncated_jpeg = encode_jpeg(image_of(11))[:-60]
    return {3: png(image_of(3))[:40], 5: b"not an image at all", 9: png(np.zeros((SIZE + 2, SIZE, 3), np.uint8)),
            11: truncated_jpeg}[index]  # fmt: skip


def bad_dataset(root: Path) -> tuple[Path, dict[int, str]]:
    """12 images of which five are bad (3, 5, 7, 9, 11), and the message each one must produce."""
    payloads = {index: bad_payload(index) for index in (3, 5, 9, 11)}
    labels = [i % NUM_CLASSES for i in range(12)]
    labels[7] = NUM_CLASSES
    make_rec(root, labels, payloads=payloads)
    return root, {
        3: "cannot decode image",
        5: "payload of 19 bytes is not a JPEG, PNG or BMP",
        7: rf"label {NUM_CLASSES} outside \[0, {NUM_CLASSES}\)",
        9: f"image is {SIZE}x{SIZE + 2}, expected {SIZE}x{SIZE}",
        11: "cannot decode image",
    }
