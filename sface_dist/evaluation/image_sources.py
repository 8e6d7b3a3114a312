"""Aligned face crops to embed: every image under a folder, or every image record of a ``.rec``.

Both sources decode with PIL to uint8 RGB ``[3, S, S]``; crops that are not ``S x S``
are resized (bilinear) and counted, so the caller can warn once, as insightface does.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sface_dist.data.dataset_checks import dataset_rec_path
from sface_dist.data.recordio import FaceRecordIndex, RecordIOReader


class ImageSourceError(ValueError):
    """An image source that cannot be read, named with the reason."""


class _Decoder:
    """Decodes encoded crops to ``[3, S, S]`` and counts the ones that needed resizing."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.resized = 0
        self._lock = threading.Lock()

    def decode(self, opened: Image.Image) -> np.ndarray:
        image = opened.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            with self._lock:
                self.resized += 1
        return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


class ImageFiles:
    """The image files ``paths``, decoded to ``[3, S, S]`` uint8 RGB; ``names`` say them in messages and outputs."""

    def __init__(self, paths: list[Path], image_size: int = 112, names: list[str] | None = None) -> None:
        self.paths = paths
        self.names = names if names is not None else [str(path) for path in paths]
        self._decoder = _Decoder(image_size)

    @property
    def resized(self) -> int:
        return self._decoder.resized

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                return self._decoder.decode(opened)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ImageSourceError(f"{path}: cannot read image ({error})") from None


class FolderImages(ImageFiles):
    """Every image file under ``root`` (recursively, sorted); ``names`` are paths relative to ``root``."""

    def __init__(self, root: str | os.PathLike[str], image_size: int = 112) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ImageSourceError(f"{self.root}: not a directory")
        extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
        paths = sorted(
            path
            for path in self.root.rglob("*")
            if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith(".")
        )
        if not paths:
            raise ImageSourceError(f"{self.root}: holds no image files")
        super().__init__(paths, image_size, [path.relative_to(self.root).as_posix() for path in paths])


class RecordImages:
    """The image records of a dataset, named by its folder or its ``.rec`` (index: the ``.idx`` beside it);
    ``labels`` fill in as images load."""

    def __init__(self, dataset: str | os.PathLike[str], image_size: int = 112) -> None:
        rec_path = dataset_rec_path(dataset)
        self.reader = RecordIOReader(rec_path, rec_path.with_suffix(".idx"))
        self.index = FaceRecordIndex(self.reader)
        if len(self.index) == 0:
            raise ImageSourceError(f"{rec_path}: holds no image records")
        self.keys = np.asarray(self.index.image_keys, dtype=np.int64)
        self.labels = np.full(len(self.index), -1, dtype=np.int64)
        self._decoder = _Decoder(image_size)

    @property
    def resized(self) -> int:
        return self._decoder.resized

    def __len__(self) -> int:
        return len(self.index)

    def load(self, index: int) -> np.ndarray:
        label, encoded = self.index.read(index)
        self.labels[index] = label
        try:
            with Image.open(io.BytesIO(encoded)) as opened:
                return self._decoder.decode(opened)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ImageSourceError(f"{self.reader.location(self.index.key(index))}: cannot decode ({error})") from None
