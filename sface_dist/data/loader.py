"""``build_loader``: one epoch-sharded training iterator over a RecordIO dataset or synthetic faces.

Every epoch draws one permutation of all images from ``(seed, epoch)``, truncates it to
a multiple of ``world_size * batch_size`` and deals it out round-robin: rank ``r`` takes
positions ``r, r + world_size, ...``. Shards are disjoint and together cover every image
once per epoch up to the remainder. Horizontal flips are drawn from the same generator,
one per image index, so a batch depends only on ``(seed, epoch, rank, world_size)`` and
never on the number of workers. ``set_epoch(epoch, skip_batches)`` resumes mid-epoch.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from sface_dist.data.recordio import FaceRecordIndex, RecordIOReader
from sface_dist.data.synthetic import SyntheticFaces

if TYPE_CHECKING:
    from sface_dist.config import DataConfig

BACKENDS = ("torch", "synthetic")

Item = tuple[int, bool]
"""An image index and whether to flip it horizontally."""


class DataError(ValueError):
    """A dataset or data configuration that cannot be loaded as asked."""


class RecordFaceDataset(Dataset[tuple[np.ndarray, int]]):
    """Images and labels of ``root/train.rec`` decoded with PIL, as ``uint8 [H, W, 3]`` RGB."""

    def __init__(self, root: str | Path, num_classes: int, image_size: int) -> None:
        root = Path(root)
        self.reader = RecordIOReader(root / "train.rec", root / "train.idx")
        self.index = FaceRecordIndex(self.reader)
        self.num_classes = _resolve_num_classes(root, num_classes, image_size, self.index)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: Item) -> tuple[np.ndarray, int]:
        index, flip = item
        label, encoded = self.index.read(index)
        key = self.index.key(index)
        if not 0 <= label < self.num_classes:
            raise DataError(f"{self.reader.location(key)}: label {label} outside [0, {self.num_classes})")
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise DataError(f"{self.reader.location(key)}: cannot decode image ({error})") from None
        if pixels.shape[:2] != (self.image_size, self.image_size):
            raise DataError(
                f"{self.reader.location(key)}: image is {pixels.shape[1]}x{pixels.shape[0]}, "
                f"expected {self.image_size}x{self.image_size}"
            )
        return (pixels[:, ::-1] if flip else pixels), label


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
        self.num_classes = num_classes
        self.images_per_class = images_per_class

    def __len__(self) -> int:
        return self.num_classes * self.images_per_class

    def __getitem__(self, item: Item) -> tuple[np.ndarray, int]:
        index, flip = item
        identity, sample = divmod(index, self.images_per_class)
        pixels = self.faces.render(identity, sample)
        return (pixels[:, ::-1] if flip else pixels), identity


class EpochShardSampler(Sampler[list[Item]]):
    """Batches of ``(image index, flip)`` for one rank: see the module docstring."""

    def __init__(self, num_images: int, batch_size: int, rank: int, world_size: int, seed: int, flip: bool) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise DataError(f"data.batch_size must be >= 1, got {batch_size}")
        self.batches_per_epoch = num_images // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{num_images} images cannot fill one global batch of {world_size} ranks x {batch_size} images"
            )
        self.num_images = num_images
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.flip = flip
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if epoch < 0 or not 0 <= skip_batches <= self.batches_per_epoch:
            raise DataError(
                f"set_epoch needs epoch >= 0 and 0 <= skip_batches <= {self.batches_per_epoch}, "
                f"got {epoch}, {skip_batches}"
            )
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches

    def __iter__(self) -> Iterator[list[Item]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(self.num_images)
        flips = rng.random(self.num_images) < 0.5 if self.flip else np.zeros(self.num_images, dtype=bool)
        used = self.batches_per_epoch * self.world_size * self.batch_size
        shard = order[self.rank : used : self.world_size]
        for batch in range(self.skip_batches, self.batches_per_epoch):
            indices = shard[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield list(zip(indices.tolist(), flips[indices].tolist()))


_NORMALISE = (np.arange(256, dtype=np.float32) - np.float32(127.5)) / np.float32(127.5)
"""``(x - 127.5) / 127.5`` for every uint8 value: one gather per pixel instead of three passes."""


def collate_normalised(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``uint8 HWC`` images into ``float32 [B, 3, H, W]`` scaled to [-1, 1] by ``(x - 127.5) / 127.5``."""
    height, width, _ = samples[0][0].shape
    images = np.empty((len(samples), 3, height, width), dtype=np.float32)
    for out, (pixels, _) in zip(images, samples):
        np.take(_NORMALISE, pixels.transpose(2, 0, 1), out=out)
    return torch.from_numpy(images), torch.tensor([label for _, label in samples], dtype=torch.int64)


class FaceLoader:
    """Iterates one rank's batches of ``(images float32 [B, 3, H, W], labels int64 [B])``.

    ``len()`` is the number of batches per epoch per rank (the last partial global batch
    is dropped); after ``set_epoch(epoch, skip_batches)`` an iteration yields batches
    ``skip_batches..len()-1`` of that epoch.
    """

    def __init__(
        self, dataset: RecordFaceDataset | SyntheticFaceDataset, sampler: EpochShardSampler, num_workers: int
    ) -> None:
        self.num_classes = dataset.num_classes
        self.num_images = len(dataset)
        self._sampler = sampler
        self._loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_normalised,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
        )

    def __len__(self) -> int:
        return self._sampler.batches_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (its permutation and flips) and the batch to start from."""
        self._sampler.set_epoch(epoch, skip_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._loader)


def build_loader(cfg: DataConfig, rank: int, world_size: int, seed: int) -> FaceLoader:
    """The training loader of ``rank`` out of ``world_size`` for the backend ``cfg.backend`` names."""
    dataset: RecordFaceDataset | SyntheticFaceDataset
    if cfg.backend == "torch":
        if not cfg.root:
            raise DataError("data.root is empty: set it to the folder holding train.rec, train.idx and property")
        dataset = RecordFaceDataset(cfg.root, cfg.num_classes, cfg.image_size)
    elif cfg.backend == "synthetic":
        dataset = SyntheticFaceDataset(cfg.num_classes, cfg.synthetic_images_per_class, cfg.image_size)
    else:
        raise DataError(f"data.backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if cfg.num_workers < 0:
        raise DataError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    sampler = EpochShardSampler(len(dataset), cfg.batch_size, rank, world_size, seed, cfg.flip)
    return FaceLoader(dataset, sampler, cfg.num_workers)


def _resolve_num_classes(root: Path, configured: int, image_size: int, index: FaceRecordIndex) -> int:
    """The class count of ``root``'s property file, else of its identity records, else of the config.

    A configured count (non-zero) must agree with whichever the data states.
    """
    property_path = root / "property"
    if property_path.is_file():
        text = property_path.read_text().strip()
        try:
            num_classes, height, width = (int(field) for field in text.split(","))
        except ValueError:
            raise DataError(f"{property_path}: expected 'num_classes,height,width', got {text[:80]!r}") from None
        if configured and configured != num_classes:
            raise DataError(f"data.num_classes={configured} disagrees with {property_path} ({num_classes} classes)")
        if (height, width) != (image_size, image_size):
            raise DataError(f"data.image_size={image_size} disagrees with {property_path} ({height}x{width} images)")
        return num_classes
    known = index.num_classes
    if configured and known is not None and configured != known:
        raise DataError(
            f"data.num_classes={configured} disagrees with the {known} identity records of {index.reader.rec_path}"
        )
    if configured:
        return configured
    if known is not None:
        return known
    raise DataError(f"{root}: no property file and no identity records: set data.num_classes")
