"""``build_loader``: one rank's training batches from a RecordIO dataset or synthetic faces.

Backends (``data.backend``): ``dali`` decodes with NVIDIA DALI (``dali.py``; on the GPU when
batches go to a CUDA device), ``torch`` with simplejpeg/PIL in DataLoader workers, ``synthetic``
renders identities; ``auto`` picks ``dali`` where DALI imports and batches go to a CUDA device,
else ``torch``. Batches arrive on the ``device`` given to ``build_loader``.
All of them follow ``EpochShardSampler``: the same images, order, flips and augmentation
parameters for the same ``(seed, epoch, rank, world_size)``, resumable at any batch.

Bad records (``data.on_bad_record``): ``error`` stops with the file, key and offset;
``skip`` leaves the record out of its batch (which is then smaller), logs it and counts it
in ``loader.skipped_records``, and stops when every image of a batch is bad. Either way the
``DataError`` raised is one line naming the record: DataLoader workers hand bad records back
as ``BadRecord`` values and the main process raises, because an exception raised in a worker
reaches the trainer wrapped in that worker's traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sface_dist.config import Backend, BadRecordPolicy, choices
from sface_dist.data.augment import augment
from sface_dist.data.errors import DataError
from sface_dist.data.images import decode_rgb, image_extension
from sface_dist.data.recordio import FaceRecordIndex, RecordIOError, RecordIOReader
from sface_dist.data.sampler import EpochShardSampler, Sample
from sface_dist.data.synthetic import SyntheticFaces

if TYPE_CHECKING:
    from sface_dist.config import DataConfig

BACKENDS = choices(Backend)
BAD_RECORD_POLICIES = choices(BadRecordPolicy)

logger = logging.getLogger(__name__)


class FaceLoader(Protocol):
    """What the trainer uses: batches of ``(float32 [B, 3, H, W] in [-1, 1], int64 [B])``.

    ``len()`` is the number of batches per epoch per rank (the last partial global batch is
    dropped); after ``set_epoch(epoch, skip_batches)`` an iteration yields batches
    ``skip_batches..len()-1`` of that epoch. ``first_sample`` starts the epoch's batch grid at
    that position of its permutation (a run resumed at another world size), and ``len()``
    counts that grid. ``skipped_records`` counts the bad records left out.
    """

    num_classes: int
    num_images: int
    skipped_records: int

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, skip_batches: int = 0, first_sample: int = 0) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class BadRecord(NamedTuple):
    """A record left out under ``on_bad_record=skip``: its position and what is wrong (file, key, offset)."""

    image_index: int
    message: str


class RecordFaceDataset(Dataset[tuple[np.ndarray, int]]):
    """Images and labels of ``root/train.rec`` (any layout), decoded as ``uint8 [H, W, 3]`` RGB."""

    def __init__(self, root: str | Path, num_classes: int, image_size: int) -> None:
        root = Path(root)
        self.reader = RecordIOReader(root / "train.rec", root / "train.idx")
        self.index = FaceRecordIndex(self.reader)
        try:
            self.index.require_images()
        except RecordIOError as error:
            raise DataError(str(error)) from None
        self.num_classes = _resolve_num_classes(root, num_classes, image_size, self.index)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.index)

    def read_encoded(self, index: int) -> tuple[int, bytes]:
        """Label and encoded bytes of image ``index``, checked: framing, label (whole, in range), image signature."""
        key = self.index.key(index)
        try:
            label, encoded = self.index.read(index)
        except RecordIOError as error:
            raise DataError(str(error)) from None
        if not 0 <= label < self.num_classes:
            raise DataError(f"{self.reader.location(key)}: label {label} outside [0, {self.num_classes})")
        if not image_extension(encoded):
            raise DataError(f"{self.reader.location(key)}: payload of {len(encoded)} bytes is not a JPEG, PNG or BMP")
        return label, encoded

    def decode(self, index: int, encoded: bytes) -> np.ndarray:
        """``encoded`` as ``uint8 [image_size, image_size, 3]`` RGB; errors name the record."""
        try:
            pixels = decode_rgb(encoded)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise DataError(f"{self.reader.location(self.index.key(index))}: cannot decode image ({error})") from None
        if pixels.shape[:2] != (self.image_size, self.image_size):
            raise DataError(
                f"{self.reader.location(self.index.key(index))}: image is {pixels.shape[1]}x{pixels.shape[0]}, "
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
        self.num_classes = num_classes
        self.images_per_class = images_per_class

    def __len__(self) -> int:
        return self.num_classes * self.images_per_class

    def __getitem__(self, sample: Sample) -> tuple[np.ndarray, int]:
        identity, image = divmod(sample.image_index, self.images_per_class)
        return augment(self.faces.render(identity, image), sample), identity


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
        except DataError as error:
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


def every_image_bad(bad: list[BadRecord]) -> DataError:
    """The error for a batch whose images were all bad records under ``on_bad_record=skip``."""
    return DataError(
        f"{bad[0].message}; every image of this batch of {len(bad)} was a bad record, "
        "so data.on_bad_record=skip has nothing to train on"
    )


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` to contiguous ``float32 [B, 3, H, W]`` as ``(x - 127.5) / 127.5``, on ``pixels``' device.

    On the CPU this runs in numpy, one thread: torch's OpenMP threads would spin on the cores
    the DataLoader workers need. The float32 results are the same bits either way.
    """
    batch, height, width, channels = pixels.shape
    images = torch.empty((batch, channels, height, width), dtype=torch.float32, device=pixels.device)
    if pixels.is_cuda:
        images.copy_(pixels.permute(0, 3, 1, 2))
        return images.sub_(127.5).div_(127.5)
    out = images.numpy()
    np.subtract(pixels.numpy().transpose(0, 3, 1, 2), np.float32(127.5), out=out, dtype=np.float32)
    np.divide(out, np.float32(127.5), out=out)
    return images


class TorchFaceLoader:
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
        self.num_images = len(dataset)
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
                raise DataError(bad[0].message)
            if not len(labels):
                raise every_image_bad(bad)
            for record in bad:
                log_skipped(record)
            self.skipped_records += len(bad)
            yield pixels, labels


def log_skipped(record: BadRecord) -> None:
    logger.warning("data.on_bad_record=skip: left out %s", record.message)


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


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``auto`` stands for with batches on ``device``; other names are returned as they are."""
    if backend != "auto":
        return backend
    from sface_dist.data.dali import dali_available  # DALI stays optional

    return "dali" if dali_available() and device.type == "cuda" else "torch"


def build_loader(
    cfg: DataConfig, rank: int, world_size: int, seed: int, device: torch.device = torch.device("cpu")
) -> FaceLoader:
    """The training loader of ``rank`` out of ``world_size`` for the backend ``cfg.backend`` names.

    Batches arrive on ``device``: a CUDA device gets GPU decoding (``dali``) or pinned memory and a
    side-stream copy (``torch``); the CPU gets batches normalised in this process.
    """
    if cfg.backend not in BACKENDS:
        raise DataError(f"data.backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if cfg.on_bad_record not in BAD_RECORD_POLICIES:
        raise DataError(f"data.on_bad_record {cfg.on_bad_record!r} is not one of {', '.join(BAD_RECORD_POLICIES)}")
    if cfg.num_workers < 0:
        raise DataError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    backend = resolve_backend(cfg.backend, device)
    dataset: RecordFaceDataset | SyntheticFaceDataset
    if backend == "synthetic":
        dataset = SyntheticFaceDataset(cfg.num_classes, cfg.synthetic_images_per_class, cfg.image_size)
    else:
        if not cfg.root:
            raise DataError("data.root is empty: set it to the folder holding train.rec, train.idx and property")
        dataset = RecordFaceDataset(cfg.root, cfg.num_classes, cfg.image_size)
    sampler = EpochShardSampler(
        len(dataset), cfg.batch_size, rank, world_size, seed, cfg.flip, cfg.augment, cfg.image_size
    )
    skip_bad = cfg.on_bad_record == "skip"
    if backend == "dali":
        from sface_dist.data.dali import DaliFaceLoader  # DALI stays optional

        assert isinstance(dataset, RecordFaceDataset)
        return DaliFaceLoader(dataset, sampler, max(cfg.num_workers, 1), device, skip_bad)
    return TorchFaceLoader(dataset, sampler, cfg.num_workers, device, skip_bad)


def _resolve_num_classes(root: Path, configured: int, image_size: int, index: FaceRecordIndex) -> int:
    """The class count of ``root``'s property file, else of its identity records, else of the config.

    The property file, the identity records and a configured count (non-zero) must agree.
    """
    property_path = root / "property"
    known = index.num_classes
    if property_path.is_file():
        text = property_path.read_text().strip()
        try:
            num_classes, height, width = (int(field) for field in text.split(","))
        except ValueError:
            raise DataError(f"{property_path}: expected 'num_classes,height,width', got {text[:80]!r}") from None
        if known is not None and known != num_classes:
            raise DataError(
                f"{property_path} says {num_classes} classes, the identity records of {index.reader.rec_path} "
                f"say {known}"
            )
        if configured and configured != num_classes:
            raise DataError(f"data.num_classes={configured} disagrees with {property_path} ({num_classes} classes)")
        if (height, width) != (image_size, image_size):
            raise DataError(f"data.image_size={image_size} disagrees with {property_path} ({height}x{width} images)")
        return num_classes
    if configured and known is not None and configured != known:
        raise DataError(
            f"data.num_classes={configured} disagrees with the {known} identity records of {index.reader.rec_path}"
        )
    if configured:
        return configured
    if known is not None:
        return known
    raise DataError(f"{root}: no property file and no identity records: set data.num_classes")
