"""``build_loader`` on every backend: sharding, epoch order, resumption, normalisation, flips, bad records."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sface_dist.config import DataConfig
from sface_dist.data.dali import dali_available
from sface_dist.data.errors import BadRecordError, DataError
from sface_dist.data.loader import build_loader, resolve_backend
from sface_dist.data.recordio import FaceRecordWriter, RecordIOReader
from sface_dist.data.sampler import EpochShardSampler, Sample
from sface_dist.data.synthetic import SyntheticFaces

from loader_datasets import NUM_CLASSES, SIZE, bad_dataset, bad_payload, config, epoch, image_of, make_rec, png

NUM_IMAGES = 50
RECORD_BACKENDS = ["torch", "dali"]


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rec(tmp_path_factory.mktemp("rec"), [i % NUM_CLASSES for i in range(NUM_IMAGES)])


def decode(images: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Image indices and flip flags of a batch built from ``image_of``."""
    pixels = (images * 127.5 + 127.5).round().to(torch.int64)
    flipped = (pixels[:, 1, 0, 0] > pixels[:, 1, 0, -1]).tolist()
    return pixels[:, 0, 0, 0].tolist(), flipped


def assert_same_batches(
    first: list[tuple[torch.Tensor, torch.Tensor]], second: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    assert len(first) == len(second)
    for (x, y), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(y, y2)
        torch.testing.assert_close(x, x2, rtol=0, atol=1e-6)  # DALI normalises with a multiply


@pytest.mark.parametrize("backend", RECORD_BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_epoch(dataset_root: Path, world_size: int, backend: str) -> None:
    per_global_batch = world_size * 4
    covered: list[int] = []
    for rank in range(world_size):
        loader = build_loader(config(dataset_root, backend=backend), rank, world_size, seed=3)
        assert (loader.num_images, loader.num_classes) == (NUM_IMAGES, NUM_CLASSES)
        assert len(loader) == NUM_IMAGES // per_global_batch
        batches = epoch(loader, 0)
        assert len(batches) == len(loader)
        for images, labels in batches:
            indices, _ = decode(images)
            assert labels.dtype == torch.int64 and labels.tolist() == [i % NUM_CLASSES for i in indices]
            covered += indices
    assert len(covered) == len(set(covered)) == NUM_IMAGES // per_global_batch * per_global_batch


@pytest.mark.parametrize("backend", RECORD_BACKENDS)
def test_epoch_order_differs_between_epochs_and_is_reproducible(dataset_root: Path, backend: str) -> None:
    first = build_loader(config(dataset_root, backend=backend), 0, 2, seed=7)
    second = build_loader(config(dataset_root, backend=backend), 0, 2, seed=7)
    epoch0, epoch1 = epoch(first, 0), epoch(first, 1)
    assert [decode(x)[0] for x, _ in epoch0] != [decode(x)[0] for x, _ in epoch1]
    assert_same_batches(epoch1, epoch(second, 1))
    other_seed = build_loader(config(dataset_root, backend=backend), 0, 2, seed=8)
    assert [decode(x)[0] for x, _ in epoch(other_seed, 1)] != [decode(x)[0] for x, _ in epoch1]


@pytest.mark.parametrize("backend", RECORD_BACKENDS)
def test_skip_batches_resumes_the_same_order(dataset_root: Path, backend: str) -> None:
    loader = build_loader(config(dataset_root, backend=backend, augment=True), 1, 2, seed=0)
    full = epoch(loader, 2)
    resumed = epoch(loader, 2, skip=3)
    assert len(resumed) == len(full) - 3
    assert_same_batches(full[3:], resumed)
    assert epoch(loader, 2, skip=len(loader)) == []
    with pytest.raises(DataError, match="skip_batches"):
        loader.set_epoch(2, len(loader) + 1)


@pytest.mark.parametrize("backend", RECORD_BACKENDS)
def test_output_dtype_shape_normalisation_and_flips(dataset_root: Path, backend: str) -> None:
    batches = epoch(build_loader(config(dataset_root, backend=backend), 0, 1, seed=0), 0)
    images, labels = batches[0]
    assert images.dtype == torch.float32 and images.shape == (4, 3, SIZE, SIZE) and images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    indices, flips = decode(images)
    for image, index, flip in zip(images, indices, flips, strict=True):
        expected = image_of(index)[:, ::-1] if flip else image_of(index)
        reference = (torch.from_numpy(expected.copy()).permute(2, 0, 1).float() - 127.5) / 127.5
        torch.testing.assert_close(image, reference, rtol=0, atol=1e-6)
    all_flips = [flip for x, _ in batches for flip in decode(x)[1]]
    assert 0.2 < np.mean(all_flips) < 0.8
    unflipped = epoch(build_loader(config(dataset_root, backend=backend, flip=False), 0, 1, seed=0), 0)
    assert not any(flip for x, _ in unflipped for flip in decode(x)[1])
    assert all(x.min() >= -1 and x.max() <= 1 for x, _ in batches)


def test_backends_give_the_same_batches(dataset_root: Path) -> None:
    for rank in range(2):
        torch_batches = epoch(build_loader(config(dataset_root, num_workers=2), rank, 2, seed=4), 1)
        dali_batches = epoch(build_loader(config(dataset_root, backend="dali"), rank, 2, seed=4), 1)
        assert_same_batches(torch_batches, dali_batches)


def test_worker_count_does_not_change_batches(dataset_root: Path) -> None:
    serial = epoch(build_loader(config(dataset_root, augment=True), 0, 2, seed=1), 4)
    parallel_loader = build_loader(config(dataset_root, num_workers=2, augment=True), 0, 2, seed=1)
    for _ in range(2):  # persistent workers serve the next iteration too
        assert_same_batches(serial, epoch(parallel_loader, 4))


@pytest.mark.parametrize("backend", RECORD_BACKENDS)
def test_augmentations_follow_the_sampler(dataset_root: Path, backend: str) -> None:
    plain = build_loader(config(dataset_root, backend=backend, batch_size=25), 0, 1, seed=2)
    augmented = build_loader(config(dataset_root, backend=backend, batch_size=25, augment=True), 0, 1, seed=2)
    sampler = EpochShardSampler(NUM_IMAGES, 25, 0, 1, seed=2, flip=True, augment=True, image_size=SIZE)
    changed = unchanged = 0
    for (x, y), (x2, y2), samples in zip(epoch(plain, 0), epoch(augmented, 0), sampler.batches(0, 0), strict=True):
        assert torch.equal(y, y2)
        for image, image2, sample in zip(x, x2, samples, strict=True):
            if sample.augmented:
                changed += not torch.equal(image, image2)
            else:
                unchanged += 1
                torch.testing.assert_close(image, image2, rtol=0, atol=1e-6)
    assert changed >= 10 and unchanged >= 10


def test_sampler_draws_are_reproducible_and_in_range() -> None:
    sampler = EpochShardSampler(10_000, 1000, 1, 2, seed=0, flip=True, augment=True, image_size=112)
    samples = [sample for batch in sampler.batches(3, 0) for sample in batch]
    assert samples == [sample for batch in sampler.batches(3, 0) for sample in batch]
    assert samples[1000:] == [sample for batch in sampler.batches(3, 1) for sample in batch]
    downscaled = [s.downscale for s in samples if s.downscale]
    assert 0.05 < len(downscaled) / len(samples) < 0.15 and min(downscaled) >= 56 and max(downscaled) <= 90
    assert 0.05 < np.mean([s.saturation == 0 for s in samples]) < 0.15
    assert 0.15 < np.mean([s.blur_sigma > 0 for s in samples]) < 0.25
    assert all(0 <= s.hue <= 20 for s in samples)


@pytest.mark.parametrize("backend", RECORD_BACKENDS)
def test_bad_records_are_errors_that_name_file_key_and_offset(tmp_path: Path, backend: str) -> None:
    _, problems = bad_dataset(tmp_path / "all")  # for the messages
    for index, message in problems.items():
        labels = [i % NUM_CLASSES for i in range(12)]
        payloads = {}
        if index == 7:
            labels[7] = NUM_CLASSES
        else:
            payloads = {index: bad_payload(index)}
        root = make_rec(tmp_path / f"bad{index}", labels, payloads=payloads)
        offset = RecordIOReader(root / "train.rec", root / "train.idx").offset(index + 1)
        loader = build_loader(config(root, backend=backend, batch_size=12), 0, 1, seed=0)
        expected = rf"{root / 'train.rec'}: key {index + 1} at offset {offset}: {message}"
        with pytest.raises(BadRecordError, match=expected):
            list(loader)


@pytest.mark.parametrize("backend", RECORD_BACKENDS)
def test_skip_leaves_bad_records_out_and_counts_them(
    tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root, problems = bad_dataset(tmp_path)
    loader = build_loader(config(root, backend=backend, batch_size=3, on_bad_record="skip"), 0, 1, seed=0)
    batches = epoch(loader, 0)
    warnings = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("warning: data.on_bad_record=skip: left out ")]
    seen = sorted(index for images, _ in batches for index in decode(images)[0])
    assert seen == [i for i in range(12) if i not in problems]
    assert sum(len(labels) for _, labels in batches) == 7 and len(batches) == 4
    assert loader.skipped_records == 5
    for index, message in problems.items():
        assert any(f"key {index + 1} at offset" in line and re.search(message, line) for line in warnings)
    epoch(loader, 1)
    assert loader.skipped_records == 10  # counted again in every epoch that meets them


def test_property_that_disagrees_with_identity_records(tmp_path: Path) -> None:
    root = make_rec(tmp_path, [0, 1, 2, 3], num_classes=4)
    (root / "property").write_text(f"7,{SIZE},{SIZE}\n")
    with pytest.raises(DataError, match=rf"{root / 'property'} says 7 classes, the identity records .* say 4"):
        build_loader(config(root), 0, 1, seed=0)


def test_flat_layout_with_property(tmp_path: Path) -> None:
    with FaceRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx", identity_sizes=None) as writer:
        for index in range(8):
            writer.write(index % 2, png(image_of(index)))
    (tmp_path / "property").write_text(f"2,{SIZE},{SIZE}\n")
    batches = epoch(build_loader(config(tmp_path, flip=False), 0, 1, seed=0), 0)
    assert sorted(i for x, _ in batches for i in decode(x)[0]) == list(range(8))
    assert all(y.tolist() == [i % 2 for i in decode(x)[0]] for x, y in batches)


@pytest.mark.parametrize("num_classes", [NUM_CLASSES - 1, NUM_CLASSES + 1])
def test_num_classes_must_match_property(dataset_root: Path, num_classes: int) -> None:
    with pytest.raises(DataError, match=rf"data.num_classes={num_classes} disagrees with {dataset_root / 'property'}"):
        build_loader(config(dataset_root, num_classes=num_classes), 0, 1, seed=0)
    assert build_loader(config(dataset_root, num_classes=NUM_CLASSES), 0, 1, seed=0).num_classes == NUM_CLASSES


def test_configuration_errors(dataset_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.image_size=16 disagrees with .*property \(8x8 images\)"):
        build_loader(config(dataset_root, image_size=16), 0, 1, seed=0)
    with pytest.raises(DataError, match="data.backend 'dali2' is not one of auto, dali, torch, synthetic"):
        build_loader(config(dataset_root, backend="dali2"), 0, 1, seed=0)
    with pytest.raises(DataError, match="data.on_bad_record 'ignore' is not one of error, skip"):
        build_loader(config(dataset_root, on_bad_record="ignore"), 0, 1, seed=0)
    with pytest.raises(DataError, match="data.root is empty"):
        build_loader(DataConfig(root="", num_workers=0), 0, 1, seed=0)
    with pytest.raises(DataError, match="50 images cannot fill one global batch of 4 ranks x 16 images"):
        build_loader(config(dataset_root, batch_size=16), 0, 4, seed=0)
    with pytest.raises(DataError, match=r"rank 2 is not in \[0, world_size=2\)"):
        build_loader(config(dataset_root), 2, 2, seed=0)
    with pytest.raises(DataError, match=rf"^{tmp_path}: the dataset folder holds no train\.rec$"):
        build_loader(config(tmp_path), 0, 1, seed=0)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nowhere'}: no such dataset folder or \.rec file$"):
        build_loader(config(tmp_path / "nowhere"), 0, 1, seed=0)


def test_auto_backend_picks_dali_for_a_cuda_device_only() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == ("dali" if dali_available() else "torch")
    assert resolve_backend("synthetic", torch.device("cuda")) == "synthetic"


def test_synthetic_backend_follows_the_same_sharding(tmp_path: Path) -> None:
    cfg = config(tmp_path, backend="synthetic", num_classes=6, synthetic_images_per_class=3, image_size=16)
    faces = SyntheticFaces(6, image_size=16)
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, seed=5)
        assert (loader.num_images, loader.num_classes, len(loader)) == (18, 6, 2)
        sampler = EpochShardSampler(18, 4, rank, 2, seed=5, flip=True)
        for (images, labels), samples in zip(epoch(loader, 1), sampler.batches(1, 0), strict=True):
            rendered = [faces.render(*divmod(sample.image_index, 3)) for sample in samples]
            expected = [
                image[:, ::-1] if sample.flip else image for image, sample in zip(rendered, samples, strict=True)
            ]
            assert labels.tolist() == [sample.image_index // 3 for sample in samples]
            pixels = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float()
            assert torch.equal(images, (pixels - 127.5) / 127.5)
    with pytest.raises(DataError, match="synthetic backend needs data.num_classes >= 1"):
        build_loader(config(tmp_path, backend="synthetic"), 0, 1, seed=0)


def test_synthetic_faces_are_deterministic_and_distinct() -> None:
    faces = SyntheticFaces(4, image_size=32, seed=1)
    image = faces.render(2, 5)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert np.array_equal(image, SyntheticFaces(4, image_size=32, seed=1).render(2, 5))
    assert not np.array_equal(image, faces.render(2, 6))
    assert not np.array_equal(image, SyntheticFaces(4, image_size=32, seed=2).render(2, 5))


def test_sample_defaults_are_neutral() -> None:
    assert not Sample(0, False).augmented
    assert Sample(0, True, saturation=0.0).augmented


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copy needs CUDA")
def test_torch_backend_on_gpu_gives_the_cpu_batches(dataset_root: Path) -> None:
    cuda = torch.device("cuda")
    for workers in (0, 2):
        on_gpu = build_loader(config(dataset_root, num_workers=workers, augment=True), 1, 2, seed=5, device=cuda)
        batches = epoch(on_gpu, 3)
        assert all(x.is_cuda and y.is_cuda for x, y in batches)
        on_cpu = epoch(build_loader(config(dataset_root, augment=True), 1, 2, seed=5), 3)
        assert_same_batches([(x.cpu(), y.cpu()) for x, y in batches], on_cpu)


@pytest.mark.parametrize(("world_before", "world_after"), [(2, 1), (1, 3), (4, 3)])
def test_first_sample_continues_the_permutation_at_another_world_size(world_before: int, world_after: int) -> None:
    """The global batches of an epoch are consecutive slices of one permutation at every world size, so a run
    that trained on ``n`` samples continues at position ``n`` whatever its new batch grid."""
    num_images, batch, seed, epoch = 1000, 8, 3, 2
    order = np.random.default_rng((seed, epoch)).permutation(num_images)

    def global_batches(world: int, first_sample: int) -> list[list[int]]:
        ranks = [EpochShardSampler(num_images, batch, rank, world, seed=seed, flip=True) for rank in range(world)]
        for sampler in ranks:
            sampler.set_epoch(epoch, first_sample=first_sample)
        per_rank = [list(sampler) for sampler in ranks]
        assert len({len(batches) for batches in per_rank}) == 1
        return [sorted(s.image_index for r in range(world) for s in per_rank[r][b]) for b in range(len(per_rank[0]))]

    global_before = batch * world_before
    before = global_batches(world_before, 0)
    assert before[:2] == [sorted(order[i * global_before : (i + 1) * global_before].tolist()) for i in range(2)]
    stop = 5 * global_before + batch  # not a multiple of the new global batch for every pair
    after = global_batches(world_after, stop)
    global_after = batch * world_after
    assert len(after) == (num_images - stop) // global_after
    for number, images in enumerate(after):
        start = stop + number * global_after
        assert images == sorted(order[start : start + global_after].tolist())
