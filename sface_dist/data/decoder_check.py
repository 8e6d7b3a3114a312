"""Start-up check of DALI's GPU decoder (``mixed``, nvJPEG) against the CPU decode of the same images.

``build_loader`` runs it before handing out a ``dali`` loader that decodes on a GPU: the first batch
of epoch 0 (the sampler's images and flips, without augmentation) comes from DALI on the GPU and
from the ``torch`` backend on the CPU, and ``compare_batches`` wants the same labels and shape,
pixels within [-1, 1] and a mean absolute difference within ``MEAN_ABS_TOLERANCE``. On a failure
``data.backend: auto`` loads with ``torch`` after one warning line naming the cause, and
``data.backend: dali`` raises ``DataError`` with it (docs/data.md, Backends).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sface_dist.console import warn
from sface_dist.data.dali import DaliFaceLoader
from sface_dist.data.datasets import RecordFaceDataset
from sface_dist.data.errors import BadRecordError, DataError
from sface_dist.data.sampler import EpochShardSampler
from sface_dist.data.torch_backend import TorchFaceLoader
from sface_dist.parallel.agreement import first_failure
from sface_dist.parallel.collectives import group_rank

MEAN_ABS_TOLERANCE = 3 / 127.5
"""Mean |GPU - CPU| of the normalised pixels: 3 grey levels. nvJPEG and libjpeg-turbo round the IDCT and the
chroma upsampling differently, a level or two on average (tests/unit/test_dali_backend.py bounds the largest
difference on flat images by the same 3 levels); a wrong decode is off by tens."""
RANGE_SLACK = 1e-6
"""How far past ±1 a normalised pixel may lie: DALI divides by 127.5 as a multiplication by its inverse."""

Batch = tuple[Tensor, Tensor]


def compare_batches(decoded: Batch, reference: Batch) -> str | None:
    """None when ``decoded`` (images [B, 3, H, W], labels [B]) agrees with ``reference``, the CPU decode of the
    same samples; else what differs, in one line."""
    images, labels = (tensor.detach().cpu() for tensor in decoded)
    expected_images, expected_labels = reference
    if tuple(images.shape) != tuple(expected_images.shape):
        return f"batch of shape {tuple(images.shape)}, the CPU decode has {tuple(expected_images.shape)}"
    if not torch.equal(labels.view(-1).long(), expected_labels.view(-1).long()):
        return "labels differ from the CPU decode's"
    images = images.float()
    if not torch.isfinite(images).all():
        return "non-finite pixels"
    low, high = images.min().item(), images.max().item()
    if low < -1.0 - RANGE_SLACK or high > 1.0 + RANGE_SLACK:
        return f"pixels in [{low:.3g}, {high:.3g}], expected within [-1, 1]"
    difference = (images - expected_images.float()).abs().mean().item()
    if not difference <= MEAN_ABS_TOLERANCE:
        return (
            f"mean absolute difference {difference:.2g} from the CPU decode, "
            f"tolerance {MEAN_ABS_TOLERANCE:.2g} (3 grey levels)"
        )
    return None


def first_batches(
    dataset: RecordFaceDataset, sampler: EpochShardSampler, num_threads: int, device: torch.device, skip_bad: bool
) -> tuple[Batch, Batch]:
    """Epoch 0's first batch (no augmentation) from DALI on ``device`` and from the torch backend on the CPU."""
    plain = EpochShardSampler(
        len(dataset), sampler.batch_size, sampler.rank, sampler.world_size, sampler.seed, sampler.flip,
        False, sampler.image_size,
    )
    decoded = next(iter(DaliFaceLoader(dataset, plain, num_threads, device, skip_bad)))
    reference = next(iter(TorchFaceLoader(dataset, plain, 0, torch.device("cpu"), skip_bad)))
    return decoded, reference


def check_dali_decoder(
    dataset: RecordFaceDataset, sampler: EpochShardSampler, num_threads: int, device: torch.device, skip_bad: bool
) -> str | None:
    """None when DALI on ``device`` decodes the first batch as the CPU does; else the cause, in one line.

    A bad record is not the decoder's fault: it raises as it would in training.
    """
    try:
        decoded, reference = first_batches(dataset, sampler, num_threads, device, skip_bad)
    except BadRecordError:
        raise
    except Exception as error:  # DALI reports build, decode and device failures as plain runtime errors
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return compare_batches(decoded, reference)


def dali_decoder_agrees(
    backend: str,
    dataset: RecordFaceDataset,
    sampler: EpochShardSampler,
    num_threads: int,
    device: torch.device,
    skip_bad: bool,
) -> bool:
    """Whether to load with DALI on ``device`` (``backend``: the ``data.backend`` setting, ``auto`` or ``dali``).

    Collective: all ranks decide alike; rank 0 prints the one warning line (``auto``) with the cause found on the
    lowest failing rank, or that rank raises ``DataError`` (``dali``; ``PeerError`` on the others).
    """
    failure = first_failure(check_dali_decoder(dataset, sampler, num_threads, device, skip_bad))
    if failure is None:
        return True
    summary = f"DALI's GPU decoder failed its first-batch check{failure.where}: {failure.cause}"
    if backend == "dali":
        error = DataError(f"data.backend=dali: {summary} (data.backend=auto would load with torch)")
        failure.raise_here(error, summary)
    warn(f"data.backend=auto: {summary}; loading with data.backend=torch", group_rank(None))
    return False
