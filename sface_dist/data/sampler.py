"""Which images each rank reads, in which order, and with which random flips and augmentations.

Every epoch draws one permutation of all images from ``(seed, epoch)``, truncates it to a
multiple of ``world_size * batch_size`` and deals it out round-robin: rank ``r`` takes
positions ``r, r + world_size, ...``. Shards are disjoint and together cover every image
once per epoch up to the remainder. The flips and augmentation parameters of batch ``b``
come from a generator seeded with ``(seed, epoch, world_size, rank, b)``, so a batch depends
only on those numbers: not on the backend, the number of workers, or where iteration
started, which is what makes ``set_epoch(epoch, skip_batches)`` resume exactly.

Global batch ``b`` is the contiguous slice ``[b·G, (b+1)·G)`` of the permutation (``G`` =
``world_size * batch_size``), so a position in an epoch is a sample count that means the
same at every world size. A run resumed at another world size continues from that count:
``set_epoch(epoch, first_sample=n)`` starts the batch grid at position ``n``.

``exclude(indices)`` takes images out of every later epoch (cleaning inside a run): an epoch's order is then
its permutation of all images with the excluded ones left out, so it too is the same at every world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from sface_dist.data.errors import DataError

DOWNSCALE_PROBABILITY = 0.1
DOWNSCALE_RANGE = (0.5, 0.8)
"""Fraction of the image size to shrink to before scaling back (the peer's random resize)."""
BLUR_PROBABILITY = 0.2
BLUR_SIGMA_RANGE = (0.5, 1.5)
HSV_PROBABILITY = 0.2
HUE_RANGE = (0.0, 20.0)
"""Degrees."""
SATURATION_RANGE = (1.0, 1.2)
GRAY_PROBABILITY = 0.1


class Sample(NamedTuple):
    """One image of a batch and what to do to it (the neutral values mean: nothing)."""

    image_index: int
    flip: bool
    downscale: int = 0
    """Side in pixels to shrink to and scale back from; 0: no downscale."""
    blur_sigma: float = 0.0
    hue: float = 0.0
    """Hue rotation in degrees."""
    saturation: float = 1.0
    """Saturation factor; 0 makes the image grey."""

    @property
    def augmented(self) -> bool:
        return bool(self.downscale or self.blur_sigma or self.hue or self.saturation != 1.0)


class EpochShardSampler:
    """Batches of ``Sample`` for one rank: see the module docstring."""

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        flip: bool,
        augment: bool = False,
        image_size: int = 112,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise DataError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_images // (world_size * batch_size) == 0:
            raise DataError(
                f"{num_images} images cannot fill one global batch of {world_size} ranks x {batch_size} images"
            )
        self.num_images = num_images
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.flip = flip
        self.augment = augment
        self.image_size = image_size
        self.epoch = 0
        self.skip_batches = 0
        self.first_sample = 0
        self.excluded = np.zeros(0, dtype=np.int64)
        """Sorted indices of the images left out of every epoch."""

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def kept_images(self) -> int:
        """The images an epoch goes through: all of them but the excluded ones."""
        return self.num_images - len(self.excluded)

    @property
    def batches_per_epoch(self) -> int:
        """Global batches of the current epoch from ``first_sample`` on (the remainder is dropped)."""
        return (self.kept_images - self.first_sample) // self.global_batch

    def exclude(self, indices: np.ndarray) -> None:
        """Leave images ``indices`` out of every epoch from the next ``set_epoch`` on; the excluded set grows."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_images):
            raise DataError(f"exclude: image indices must lie in [0, {self.num_images})")
        excluded = np.union1d(self.excluded, indices)
        kept = self.num_images - len(excluded)
        if kept // self.global_batch == 0:
            raise DataError(f"excluding {len(excluded)} images leaves {kept} of {self.num_images}, less than one "
                            f"global batch of {self.global_batch}")
        self.excluded = excluded

    def set_epoch(self, epoch: int, skip_batches: int = 0, first_sample: int = 0) -> None:
        """Select ``epoch``, the permutation position its batch grid starts at, and the batches to skip."""
        if not 0 <= first_sample <= self.kept_images:
            raise DataError(f"set_epoch needs 0 <= first_sample <= {self.kept_images}, got {first_sample}")
        self.first_sample = first_sample
        if epoch < 0 or not 0 <= skip_batches <= self.batches_per_epoch:
            raise DataError(
                f"set_epoch needs epoch >= 0 and 0 <= skip_batches <= {self.batches_per_epoch}, "
                f"got {epoch}, {skip_batches}"
            )
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches

    def __iter__(self) -> Iterator[list[Sample]]:
        return self.batches(self.epoch, self.skip_batches)

    def batches(self, epoch: int, start: int) -> Iterator[list[Sample]]:
        """Batches ``start..`` of ``epoch`` (``set_epoch`` and iteration use this)."""
        order = np.random.default_rng((self.seed, epoch)).permutation(self.num_images)
        if len(self.excluded):
            order = order[~np.isin(order, self.excluded)]
        first = self.first_sample
        used = first + self.batches_per_epoch * self.global_batch
        shard = order[first + self.rank : used : self.world_size]
        for batch in range(start, self.batches_per_epoch):
            yield self._samples(shard[batch * self.batch_size : (batch + 1) * self.batch_size], epoch, batch)

    def _samples(self, indices: np.ndarray, epoch: int, number: int) -> list[Sample]:
        """The samples of batch ``number`` of ``epoch`` (from ``first_sample``), whose images are ``indices``."""
        grid = (self.first_sample,) if self.first_sample else ()
        rng = np.random.default_rng((self.seed, epoch, self.world_size, self.rank, number, *grid))
        count = len(indices)
        flips = rng.random(count) < 0.5 if self.flip else np.zeros(count, dtype=bool)
        if not self.augment:
            return [Sample(index, flip) for index, flip in zip(indices.tolist(), flips.tolist(), strict=True)]
        low, high = (round(fraction * self.image_size) for fraction in DOWNSCALE_RANGE)
        downscale = np.where(rng.random(count) < DOWNSCALE_PROBABILITY, rng.integers(low, high + 1, count), 0)
        blur = np.where(rng.random(count) < BLUR_PROBABILITY, rng.uniform(*BLUR_SIGMA_RANGE, count), 0.0)
        jitter = rng.random(count) < HSV_PROBABILITY
        hue = np.where(jitter, rng.uniform(*HUE_RANGE, count), 0.0)
        saturation = np.where(jitter, rng.uniform(*SATURATION_RANGE, count), 1.0)
        saturation = np.where(rng.random(count) < GRAY_PROBABILITY, 0.0, saturation)
        columns = (indices, flips, downscale, blur, hue, saturation)
        return [Sample(*values) for values in zip(*(column.tolist() for column in columns), strict=True)]


class ExcludingLoader:
    """What a loader over an ``EpochShardSampler`` (its ``_sampler``) says of the images its epochs go through."""

    _sampler: EpochShardSampler

    @property
    def num_images(self) -> int:
        """The images an epoch goes through (the dataset's, less those excluded)."""
        return self._sampler.kept_images

    @property
    def dataset_size(self) -> int:
        """Every image of the dataset, excluded or not."""
        return self._sampler.num_images

    def exclude(self, indices: np.ndarray) -> None:
        """Leave dataset images ``indices`` out of every epoch from the next ``set_epoch`` on."""
        self._sampler.exclude(indices)
