"""``build_loader``: sharding, epoch order, resumption, normalisation, flips and errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sface_dist.config import DataConfig
from sface_dist.data.loader import DataError, EpochShardSampler, FaceLoader, build_loader
from sface_dist.data.recordio import IRHeader, RecordIOWriter, pack
from sface_dist.data.synthetic import SyntheticFaces

SIZE = 8
NUM_IMAGES = 50
NUM_CLASSES = 5


def image_of(index: int) -> np.ndarray:
    """Red encodes the image index, green rises left to right (to see flips), blue is 50."""
    pixels = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., 0] = index
    pixels[..., 1] = np.arange(SIZE) * 30
    pixels[..., 2] = 50
    return pixels


def make_rec(root: Path, labels: list[int], num_classes: int = NUM_CLASSES) -> Path:
    """An insightface-layout dataset of lossless PNG images with the given labels."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as writer:
        writer.write(0, pack(IRHeader(0, (n + 1.0, n + 1.0 + num_classes), 0, 0), b""))
        for index, label in enumerate(labels):
            png = io.BytesIO()
            Image.fromarray(image_of(index)).save(png, format="PNG")
            writer.write(index + 1, pack(IRHeader(0, float(label), index + 1, 0), png.getvalue()))
    (root / "property").write_text(f"{num_classes},{SIZE},{SIZE}\n")
    return root


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rec(tmp_path_factory.mktemp("rec"), [i % NUM_CLASSES for i in range(NUM_IMAGES)])


def config(root: Path, **overrides: object) -> DataConfig:
    values: dict[str, object] = dict(root=str(root), image_size=SIZE, batch_size=4, num_workers=0)
    return DataConfig(**(values | overrides))  # type: ignore[arg-type]


def decode(images: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Image indices and flip flags of a batch built from ``image_of``."""
    pixels = (images * 127.5 + 127.5).round().to(torch.int64)
    flipped = (pixels[:, 1, 0, 0] > pixels[:, 1, 0, -1]).tolist()
    return pixels[:, 0, 0, 0].tolist(), flipped


def epoch(loader: FaceLoader, number: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(number, skip)
    return list(loader)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_epoch(dataset_root: Path, world_size: int) -> None:
    per_global_batch = world_size * 4
    covered: list[int] = []
    for rank in range(world_size):
        loader = build_loader(config(dataset_root), rank, world_size, seed=3)
        assert (loader.num_images, loader.num_classes) == (NUM_IMAGES, NUM_CLASSES)
        assert len(loader) == NUM_IMAGES // per_global_batch
        batches = epoch(loader, 0)
        assert len(batches) == len(loader)
        for images, labels in batches:
            indices, _ = decode(images)
            assert labels.tolist() == [i % NUM_CLASSES for i in indices]
            covered += indices
    assert len(covered) == len(set(covered)) == NUM_IMAGES // per_global_batch * per_global_batch


def test_epoch_order_differs_between_epochs_and_is_reproducible(dataset_root: Path) -> None:
    first = build_loader(config(dataset_root), 0, 2, seed=7)
    second = build_loader(config(dataset_root), 0, 2, seed=7)
    epoch0, epoch1 = epoch(first, 0), epoch(first, 1)
    assert [decode(x)[0] for x, _ in epoch0] != [decode(x)[0] for x, _ in epoch1]
    for (x, y), (x2, y2) in zip(epoch1, epoch(second, 1), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other_seed = build_loader(config(dataset_root), 0, 2, seed=8)
    assert [decode(x)[0] for x, _ in epoch(other_seed, 1)] != [decode(x)[0] for x, _ in epoch1]


def test_skip_batches_resumes_the_same_order(dataset_root: Path) -> None:
    loader = build_loader(config(dataset_root), 1, 2, seed=0)
    full = epoch(loader, 2)
    resumed = epoch(loader, 2, skip=3)
    assert len(resumed) == len(full) - 3
    for (x, y), (x2, y2) in zip(full[3:], resumed, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert epoch(loader, 2, skip=len(loader)) == []
    with pytest.raises(DataError, match="skip_batches"):
        loader.set_epoch(2, len(loader) + 1)


def test_output_dtype_shape_normalisation_and_flips(dataset_root: Path) -> None:
    batches = epoch(build_loader(config(dataset_root), 0, 1, seed=0), 0)
    images, labels = batches[0]
    assert images.dtype == torch.float32 and images.shape == (4, 3, SIZE, SIZE) and images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    indices, flips = decode(images)
    for image, index, flip in zip(images, indices, flips):
        expected = image_of(index)[:, ::-1] if flip else image_of(index)
        assert torch.equal(image, (torch.from_numpy(expected.copy()).permute(2, 0, 1).float() - 127.5) / 127.5)
    all_flips = [flip for x, _ in batches for flip in decode(x)[1]]
    assert 0.2 < np.mean(all_flips) < 0.8
    unflipped = epoch(build_loader(config(dataset_root, flip=False), 0, 1, seed=0), 0)
    assert not any(flip for x, _ in unflipped for flip in decode(x)[1])
    assert all(x.min() >= -1 and x.max() <= 1 for x, _ in batches)


def test_worker_count_does_not_change_batches(dataset_root: Path) -> None:
    serial = epoch(build_loader(config(dataset_root), 0, 2, seed=1), 4)
    parallel_loader = build_loader(config(dataset_root, num_workers=2), 0, 2, seed=1)
    for _ in range(2):  # persistent workers serve the next iteration too
        for (x, y), (x2, y2) in zip(serial, epoch(parallel_loader, 4), strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_label_out_of_range_names_file_and_key(tmp_path: Path) -> None:
    labels = [i % NUM_CLASSES for i in range(8)]
    labels[5] = NUM_CLASSES
    root = make_rec(tmp_path, labels)
    loader = build_loader(config(root, batch_size=8), 0, 1, seed=0)
    with pytest.raises(DataError, match=rf"{root / 'train.rec'}: key 6 at offset \d+: label 5 outside \[0, 5\)"):
        list(loader)


@pytest.mark.parametrize("num_classes", [NUM_CLASSES - 1, NUM_CLASSES + 1])
def test_num_classes_must_match_property(dataset_root: Path, num_classes: int) -> None:
    with pytest.raises(DataError, match=rf"data.num_classes={num_classes} disagrees with {dataset_root / 'property'}"):
        build_loader(config(dataset_root, num_classes=num_classes), 0, 1, seed=0)
    assert build_loader(config(dataset_root, num_classes=NUM_CLASSES), 0, 1, seed=0).num_classes == NUM_CLASSES


def test_configuration_errors(dataset_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.image_size=16 disagrees with .*property \(8x8 images\)"):
        build_loader(config(dataset_root, image_size=16), 0, 1, seed=0)
    with pytest.raises(DataError, match="data.backend 'dali2' is not one of torch, synthetic"):
        build_loader(config(dataset_root, backend="dali2"), 0, 1, seed=0)
    with pytest.raises(DataError, match="data.root is empty"):
        build_loader(DataConfig(root="", num_workers=0), 0, 1, seed=0)
    with pytest.raises(DataError, match="50 images cannot fill one global batch of 4 ranks x 16 images"):
        build_loader(config(dataset_root, batch_size=16), 0, 4, seed=0)
    with pytest.raises(DataError, match=r"rank 2 is not in \[0, world_size=2\)"):
        build_loader(config(dataset_root), 2, 2, seed=0)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'train.rec'}: RecordIO file not found"):
        build_loader(config(tmp_path), 0, 1, seed=0)


def test_synthetic_backend_follows_the_same_sharding(tmp_path: Path) -> None:
    cfg = config(tmp_path, backend="synthetic", num_classes=6, synthetic_images_per_class=3, image_size=16)
    faces = SyntheticFaces(6, image_size=16)
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, seed=5)
        assert (loader.num_images, loader.num_classes, len(loader)) == (18, 6, 2)
        sampler = EpochShardSampler(18, 4, rank, 2, seed=5, flip=True)
        sampler.set_epoch(1)
        for (images, labels), items in zip(epoch(loader, 1), sampler, strict=True):
            rendered = [faces.render(*divmod(index, 3)) for index, _ in items]
            expected = [image[:, ::-1] if flip else image for image, (_, flip) in zip(rendered, items)]
            assert labels.tolist() == [index // 3 for index, _ in items]
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
