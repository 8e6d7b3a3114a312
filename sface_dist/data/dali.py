"""The ``dali`` backend: the project's reader and sampler feed NVIDIA DALI's decoder and operators.

Records are read in Python (``fn.external_source``, a few microseconds each) because only
then does DALI follow ``EpochShardSampler``: ``fn.readers.mxnet`` reads records in file
order through a shuffle buffer and treats insightface's header and identity records as
images, so it can give neither an epoch-seeded order, nor a resumable position, nor the
exactly-once cover that the other backends give. Decoding is ``device="mixed"`` (nvJPEG)
when batches go to a CUDA device and on CPU threads otherwise; flips and augmentation parameters come
from the sampler as per-sample arguments, so every batch is reproducible.

A record DALI cannot decode fails the whole pipeline run. The loader then decodes the
batches in flight with PIL to find the culprit, and either raises (``error``) or excludes
it, rebuilds the pipeline and resumes at the same batch (``skip``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import numpy as np
import torch

from sface_dist.data.datasets import BadRecord, RecordFaceDataset, every_image_bad, log_skipped
from sface_dist.data.errors import BadRecordError, DataError
from sface_dist.data.pixels import PIXEL_MEAN, PIXEL_STD
from sface_dist.data.sampler import EpochShardSampler, ExcludingLoader, Sample

_PREFETCH = 2
"""Batches DALI prepares ahead of the one in use."""


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported here."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


class _BatchSource:
    """``fn.external_source`` callback: each call reads the next planned batch as DALI inputs.

    Bad records (framing, label, not an image) raise, or with ``skip_bad`` are reported to
    ``on_skip`` and left out. ``excluded`` images (found undecodable earlier) are left out too.
    """

    def __init__(
        self,
        dataset: RecordFaceDataset,
        batches: Iterator[list[Sample]],
        skip_bad: bool,
        excluded: dict[int, BadRecord],
        on_skip: Callable[[BadRecord], None],
        augment: bool,
    ) -> None:
        self.dataset = dataset
        self.batches = batches
        self.skip_bad = skip_bad
        self.excluded = excluded
        self.on_skip = on_skip
        self.augment = augment
        self.handed_out: list[list[Sample]] = []

    def __call__(self) -> tuple[list[np.ndarray] | np.ndarray, ...]:
        samples = next(self.batches)  # StopIteration ends the epoch
        kept: list[Sample] = []
        bad: list[BadRecord] = []
        encoded: list[np.ndarray] = []
        labels: list[int] = []
        for sample in samples:
            if sample.image_index in self.excluded:
                bad.append(self.excluded[sample.image_index])
                self.on_skip(bad[-1])
                continue
            try:
                label, data = self.dataset.read_encoded(sample.image_index)
            except BadRecordError as error:
                if not self.skip_bad:
                    raise
                bad.append(BadRecord(sample.image_index, str(error)))
                self.on_skip(bad[-1])
                continue
            kept.append(sample)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            labels.append(label)
        if not kept:
            raise every_image_bad(bad)
        self.handed_out.append(kept)
        flip = np.array([sample.flip for sample in kept], dtype=np.int32)
        inputs: tuple[list[np.ndarray] | np.ndarray, ...] = (encoded, np.asarray(labels, dtype=np.int64), flip)
        if self.augment:
            columns = np.array([sample[2:] for sample in kept], dtype=np.float32).T
            inputs += tuple(np.ascontiguousarray(column) for column in columns)  # downscale, blur, hue, saturation
        return inputs


class DaliFaceLoader(ExcludingLoader):
    """The ``dali`` backend (see the module docstring and ``FaceLoader``)."""

    def __init__(
        self,
        dataset: RecordFaceDataset,
        sampler: EpochShardSampler,
        num_threads: int,
        device: torch.device,
        skip_bad: bool = False,
    ) -> None:
        if not dali_available():
            raise DataError("data.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130")
        self.num_classes = dataset.num_classes
        self.dataset = dataset
        self.skipped_records = 0
        cuda = device.type == "cuda"
        self.device_id = (torch.cuda.current_device() if device.index is None else device.index) if cuda else None
        """The GPU that decodes (``mixed``) and holds the batches; None: a CPU-only pipeline."""
        self._dataset = dataset
        self._sampler = sampler
        self._num_threads = num_threads
        self._skip_bad = skip_bad

    def __len__(self) -> int:
        return self._sampler.batches_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0, first_sample: int = 0) -> None:
        """Select the epoch (its permutation, flips and augmentations), where its batch grid starts and the batch
        to start from (see ``EpochShardSampler``)."""
        self._sampler.set_epoch(epoch, skip_batches, first_sample)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._iterate(self._sampler.epoch, self._sampler.skip_batches)

    def _iterate(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # DALI stays optional

        excluded: dict[int, BadRecord] = {}
        counted: set[int] = set()

        def on_skip(record: BadRecord) -> None:
            if record.image_index not in counted:
                counted.add(record.image_index)
                self.skipped_records += 1
                log_skipped(record)

        position = start
        while position < self._sampler.batches_per_epoch:
            batches_left = self._sampler.batches(epoch, position)
            source = _BatchSource(self._dataset, batches_left, self._skip_bad, excluded, on_skip, self._sampler.augment)
            first = position
            try:  # the iterator runs the first batches as soon as it is made
                outputs_of = DALIGenericIterator([self._pipeline(source)], ["images", "labels"], auto_reset=False)
                for outputs in outputs_of:
                    yield outputs[0]["images"], outputs[0]["labels"].view(-1)
                    position += 1
                return
            except DataError:
                raise
            except Exception as error:  # DALI reports decode and shape failures as plain runtime errors
                bad = _undecodable(self._dataset, source.handed_out[position - first :])
                if not bad:
                    message = f"DALI failed in epoch {epoch} at batch {position} or the next {_PREFETCH}: {error}"
                    raise DataError(message) from error
                if not self._skip_bad:
                    raise BadRecordError(bad[0].message) from None
                for record in bad:
                    excluded[record.image_index] = record

    def _pipeline(self, source: _BatchSource) -> object:
        """Decode, augment (as the sampler says), flip and normalise to ``float32 [B, 3, S, S]``."""
        from nvidia.dali import fn, pipeline_def, types  # DALI stays optional

        size = float(self._dataset.image_size)
        augment = self._sampler.augment
        decoder_device = "cpu" if self.device_id is None else "mixed"

        @pipeline_def(enable_conditionals=augment)
        def face_pipeline() -> tuple[object, object]:
            inputs = fn.external_source(source=source, num_outputs=7 if augment else 3, batch=True)
            encoded, labels, flip = inputs[:3]
            images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
            if augment:
                downscale, blur, hue, saturation = inputs[3:]
                if downscale > 0:
                    images = fn.resize(images, resize_x=downscale, resize_y=downscale)
                    images = fn.resize(images, resize_x=size, resize_y=size)
                if blur > 0:
                    images = fn.gaussian_blur(images, sigma=blur)
                if (hue != 0) | (saturation != 1):
                    images = fn.hsv(images, hue=hue, saturation=saturation)
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[PIXEL_MEAN] * 3,
                std=[PIXEL_STD] * 3,
                mirror=flip,
            )
            return images, labels

        return face_pipeline(
            batch_size=self._sampler.batch_size,
            num_threads=self._num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=_PREFETCH,
        )


def _undecodable(dataset: RecordFaceDataset, batches: list[list[Sample]]) -> list[BadRecord]:
    """The images of ``batches`` that PIL cannot decode or that have the wrong size."""
    bad = []
    for samples in batches:
        for sample in samples:
            try:
                dataset.decode(sample.image_index, dataset.read_encoded(sample.image_index)[1])
            except BadRecordError as error:
                bad.append(BadRecord(sample.image_index, str(error)))
    return bad
