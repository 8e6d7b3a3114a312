"""The images a loader serves: a RecordIO face dataset or synthetic identities, and its bad records.

Both datasets map a ``Sample`` of ``EpochShardSampler`` to ``(uint8 [H, W, 3] RGB, label)``,
augmented as the sample says. A record that cannot be used raises ``BadRecordError`` naming the
file, key and offset; under ``on_bad_record=skip`` the backends carry it on as a ``BadRecord``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from sface_dist.console import warn
from sface_dist.data.augment import augment
from sface_dist.data.dataset_checks import dataset_rec_path, read_checked, record_location, resolve_num_classes
from sface_dist.data.errors import BadRecordError, DataError
from sface_dist.data.images import decode_rgb
from sface_dist.data.recordio import FaceRecordIndex, RecordIOError, RecordIOReader
from sface_dist.data.sampler import Sample
from sface_dist.data.synthetic import SyntheticFaces


class BadRecord(NamedTuple):
    """A record left out under ``on_bad_record=skip``: its position and what is wrong (file, key, offset)."""

    image_index: int
    message: str


class RecordFaceDataset(Dataset[tuple[np.ndarray, int]]):
    """Images and labels of ``root/train.rec`` (any layout; ``root`` may also name the ``.rec`` itself), decoded as
    ``uint8 [H, W, 3]`` RGB."""

    def __init__(self, root: str | Path, num_classes: int, image_size: int) -> None:
        rec_path = dataset_rec_path(root)
        self.reader = RecordIOReader(rec_path, rec_path.with_suffix(".idx"))
        self.index = FaceRecordIndex(self.reader)
        try:
            self.index.require_images()
        except RecordIOError as error:
            raise DataError(str(error)) from None
        self.num_classes = resolve_num_classes(self.index, num_classes, image_size)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.index)

    def read_encoded(self, index: int) -> tuple[int, bytes]:
        """Label and encoded bytes of image ``index``, checked: framing, label (whole, in range), image signature."""
        return read_checked(self.index, index, self.num_classes)

    def decode(self, index: int, encoded: bytes) -> np.ndarray:
        """``encoded`` as ``uint8 [image_size, image_size, 3]`` RGB; errors name the record."""
        try:
            pixels = decode_rgb(encoded)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise BadRecordError(f"{record_location(self.index, index)}: cannot decode image ({error})") from None
        if pixels.shape[:2] != (self.image_size, self.image_size):
            raise BadRecordError(
                f"{record_location(self.index, index)}: image is {pixels.shape[1]}x{pixels.shape[0]}, "
                f"expected {self.image_size}x{self.image_size}"
            )
        return pixels

    def __getitem__(self, sample: Sample) -> tuple[np.ndarray, int]:
        label, encoded = self.read_encoded(sample.image_index)
        return augment(self.decode(sample.image_index, encoded), sample), label


class SyntheticFaceDataset(Dataset[tuple[np.ndarray, int]]):
    """``images_per_class`` rendered samples of each of ``num_classes`` synthetic identities.

    Image ``i`` is sample ``i % images_per_class`` of identity ``i // images_per_class``.
    The identities themselves are fixed (generator seed 0), whatever the training seed.
    """

    def __init__(self, num_classes: int, images_per_class: int, image_size: int) -> None:
        if num_classes < 1 or images_per_class < 1:
            raise DataError(
                f"the synthetic backend needs data.num_classes >= 1 and data.synthetic_images_per_class >= 1, "
                f"got {num_classes} and {images_per_class}"
            )
        self.faces = SyntheticFaces(num_classes, image_size)
        self.image_size = image_size
        self.num_classes = num_classes
        self.images_per_class = images_per_class

    def __len__(self) -> int:
        return self.num_classes * self.images_per_class

    def __getitem__(self, sample: Sample) -> tuple[np.ndarray, int]:
        identity, image = divmod(sample.image_index, self.images_per_class)
        return augment(self.faces.render(identity, image), sample), identity


def every_image_bad(bad: list[BadRecord]) -> DataError:
    """The error for a batch whose images were all bad records under ``on_bad_record=skip``."""
    return DataError(
        f"{bad[0].message}; every image of this batch of {len(bad)} was a bad record, "
        "so data.on_bad_record=skip has nothing to train on"
    )


def log_skipped(record: BadRecord) -> None:
    """Warn of a record left out under ``on_bad_record=skip`` (every rank of its own)."""
    warn(f"data.on_bad_record=skip: left out {record.message}")
