"""``build_loader``: one rank's training batches from a RecordIO dataset or synthetic faces.

Backends (``data.backend``): ``dali`` decodes with NVIDIA DALI (``dali.py``; on the GPU when
batches go to a CUDA device), ``torch`` with simplejpeg/PIL in DataLoader workers
(``torch_backend.py``), ``synthetic`` renders identities through the same loader; ``auto`` picks
``dali`` where DALI imports and batches go to a CUDA device, else ``torch``. DALI decoding on a
GPU is first checked against the CPU decode (``decoder_check.py``): ``auto`` falls back to ``torch``
when they disagree. Batches arrive on the ``device`` given to ``build_loader``. All backends follow
``EpochShardSampler``: the same images, order, flips and augmentation parameters for the same
``(seed, epoch, rank, world_size)``, resumable at any batch.

Bad records (``data.on_bad_record``): ``error`` stops with the file, key and offset;
``skip`` leaves the record out of its batch (which is then smaller), logs it and counts it
in ``loader.skipped_records``, and stops when every image of a batch is bad. Either way the
``DataError`` raised is one line naming the record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from sface_dist.config import Backend, BadRecordPolicy, choices
from sface_dist.data.datasets import RecordFaceDataset, SyntheticFaceDataset
from sface_dist.data.errors import DataError
from sface_dist.data.sampler import EpochShardSampler
from sface_dist.data.torch_backend import TorchFaceLoader

if TYPE_CHECKING:
    from sface_dist.config import DataConfig

BACKENDS = choices(Backend)
BAD_RECORD_POLICIES = choices(BadRecordPolicy)


class FaceLoader(Protocol):
    """What the trainer uses: batches of ``(float32 [B, 3, H, W] in [-1, 1], int64 [B])``.

    ``len()`` is the number of batches per epoch per rank (the last partial global batch is
    dropped); after ``set_epoch(epoch, skip_batches)`` an iteration yields batches
    ``skip_batches..len()-1`` of that epoch. ``first_sample`` starts the epoch's batch grid at
    that position of its permutation (a run resumed at another world size), and ``len()``
    counts that grid. ``skipped_records`` counts the bad records left out.
    """

    num_classes: int
    skipped_records: int
    dataset: RecordFaceDataset | SyntheticFaceDataset
    """Every image, by index (what cleaning inside a run scores)."""

    @property
    def num_images(self) -> int:
        """The images an epoch goes through: the dataset's, less those ``exclude`` took out."""
        ...

    @property
    def dataset_size(self) -> int:
        """Every image of the dataset, excluded or not."""
        ...

    def exclude(self, indices: np.ndarray) -> None:
        """Leave dataset images ``indices`` out of every epoch from the next ``set_epoch`` on."""
        ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, skip_batches: int = 0, first_sample: int = 0) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def gpu_decoding(device: torch.device) -> bool:
    """Whether DALI decodes on the GPU (``mixed``) for batches on ``device``: ``auto``'s pick, checked at start-up."""
    return device.type == "cuda"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``auto`` stands for with batches on ``device``; other names are returned as they are."""
    if backend != "auto":
        return backend
    from sface_dist.data.dali import dali_available  # DALI stays optional

    return "dali" if dali_available() and gpu_decoding(device) else "torch"


def build_loader(
    cfg: DataConfig, rank: int, world_size: int, seed: int, device: torch.device = torch.device("cpu")
) -> FaceLoader:
    """The training loader of ``rank`` out of ``world_size`` for the backend ``cfg.backend`` names.

    Batches arrive on ``device``: a CUDA device gets GPU decoding (``dali``) or pinned memory and a
    side-stream copy (``torch``); the CPU gets batches normalised in this process. Collective for ``dali``
    decoding on a GPU: the decoder's first-batch check (``decoder_check.py``) runs first.
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
        from sface_dist.data.decoder_check import dali_decoder_agrees

        assert isinstance(dataset, RecordFaceDataset)
        threads = max(cfg.num_workers, 1)
        loader = DaliFaceLoader(dataset, sampler, threads, device, skip_bad)
        if not gpu_decoding(device) or dali_decoder_agrees(cfg.backend, dataset, sampler, threads, device, skip_bad):
            return loader
    return TorchFaceLoader(dataset, sampler, cfg.num_workers, device, skip_bad)
