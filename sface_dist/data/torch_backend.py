"""The ``torch`` and ``synthetic`` backends: decode in DataLoader workers, normalise where the batch is used.

Workers hand over ``uint8`` batches in shared memory (a quarter of the float32 bytes); on a CUDA
device each batch goes through pinned memory and is copied and normalised on a side stream, one
batch ahead of its use. Workers hand bad records back as ``BadRecord`` values and the main
process raises, because an exception raised in a worker reaches the trainer wrapped in that
worker's traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sface_dist.data.datasets import (
    BadRecord,
    RecordFaceDataset,
    SyntheticFaceDataset,
    every_image_bad,
    log_skipped,
)
from sface_dist.data.errors import BadRecordError
from sface_dist.data.pixels import PIXEL_MEAN, PIXEL_STD
from sface_dist.data.sampler import EpochShardSampler, ExcludingLoader, Sample
from sface_dist.stop_signals import leave_stop_signals_to_the_main_process


class _Loaded(NamedTuple):
    pixels: np.ndarray
    label: int


class _BadRecordsAsValues(Dataset[_Loaded | BadRecord]):
    """Wraps a dataset so that a bad record becomes a ``BadRecord`` instead of an exception.

    Under either policy: the main process decides what a ``BadRecord`` means (``TorchFaceLoader``).
    """

    def __init__(self, dataset: RecordFaceDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, sample: Sample) -> _Loaded | BadRecord:
        try:
            return _Loaded(*self.dataset[sample])
        except BadRecordError as error:
            return BadRecord(sample.image_index, str(error))


def collate_pixels(
    samples: list[tuple[np.ndarray, int] | BadRecord],
) -> tuple[torch.Tensor, torch.Tensor, list[BadRecord]]:
    """Stack ``uint8 [H, W, 3]`` images into ``uint8 [B, H, W, 3]``; ``BadRecord`` entries come back apart.

    Batches travel from the workers as uint8, a quarter of the float32 bytes, in shared memory
    filled in place; ``normalise`` turns them into the training tensor where they are used.
    A batch of bad records only comes back with no images (the main process raises).
    """
    bad = [sample for sample in samples if isinstance(sample, BadRecord)]
    good = [sample for sample in samples if not isinstance(sample, BadRecord)]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    pixels = torch.empty((len(good), *good[0][0].shape), dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        pixels.share_memory_()
    np.stack([image for image, _ in good], out=pixels.numpy())
    return pixels, torch.tensor([label for _, label in good], dtype=torch.int64), bad


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` to contiguous ``float32 [B, 3, H, W]``, normalised as ``pixels.py`` says, on
    ``pixels``' device.

    On the CPU this runs in numpy, one thread: torch's OpenMP threads would spin on the cores
    the DataLoader workers need. The float32 results are the same bits either way.
    """
    batch, height, width, channels = pixels.shape
    images = torch.empty((batch, channels, height, width), dtype=torch.float32, device=pixels.device)
    if pixels.is_cuda:
        images.copy_(pixels.permute(0, 3, 1, 2))
        return images.sub_(PIXEL_MEAN).div_(PIXEL_STD)
    out = images.numpy()
    np.subtract(pixels.numpy().transpose(0, 3, 1, 2), np.float32(PIXEL_MEAN), out=out, dtype=np.float32)
    np.divide(out, np.float32(PIXEL_STD), out=out)
    return images


class TorchFaceLoader(ExcludingLoader):
    """The ``torch`` and ``synthetic`` backends: decode in DataLoader workers; for a CUDA ``device``,
    pinned memory and each batch copied to the GPU on a side stream one batch ahead (see ``FaceLoader``)."""

    def __init__(
        self,
        dataset: RecordFaceDataset | SyntheticFaceDataset,
        sampler: EpochShardSampler,
        num_workers: int,
        device: torch.device,
        skip_bad: bool = False,
    ) -> None:
        self.num_classes = dataset.num_classes
        self.dataset = dataset
        self.skipped_records = 0
        self._sampler = sampler
        self._skip_bad = skip_bad
        cuda = device.type == "cuda"
        self._device = device if cuda else None
        served = _BadRecordsAsValues(dataset) if isinstance(dataset, RecordFaceDataset) else dataset
        self._loader = DataLoader(
            served,  # type: ignore[arg-type]
            batch_sampler=sampler,  # type: ignore[arg-type]
            num_workers=num_workers,
            collate_fn=collate_pixels,
            pin_memory=cuda,
            persistent_workers=num_workers > 0,
            worker_init_fn=leave_stop_signals_to_the_main_process,
        )

    def __len__(self) -> int:
        return self._sampler.batches_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0, first_sample: int = 0) -> None:
        """Select the epoch (its permutation, flips and augmentations), where its batch grid starts and the batch
        to start from (see ``EpochShardSampler``)."""
        self._sampler.set_epoch(epoch, skip_batches, first_sample)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._counted(iter(self._loader))
        if self._device is None:
            return ((normalise(pixels), labels) for pixels, labels in batches)
        return _prefetch_to_device(batches, self._device)

    def _counted(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor, list[BadRecord]]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for pixels, labels, bad in batches:
            if bad and not self._skip_bad:
                raise BadRecordError(bad[0].message)
            if not len(labels):
                raise every_image_bad(bad)
            for record in bad:
                log_skipped(record)
            self.skipped_records += len(bad)
            yield pixels, labels


def _prefetch_to_device(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Copy each uint8 batch to ``device`` and normalise it there, on a side stream, while the previous
    batch is in use."""
    stream = torch.cuda.Stream(device)

    def start_copy(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.cuda.stream(stream):
            pixels, labels = (tensor.to(device, non_blocking=True) for tensor in batch)
            return normalise(pixels), labels

    pending = None
    for batch in batches:
        copied = start_copy(batch)
        if pending is not None:
            yield _ready(pending, stream, device)
        pending = copied
    if pending is not None:
        yield _ready(pending, stream, device)


def _ready(
    batch: tuple[torch.Tensor, torch.Tensor], stream: torch.cuda.Stream, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the current stream wait for ``batch``'s copy, and keep its memory alive for that stream."""
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    for tensor in batch:
        tensor.record_stream(current)
    return batch
