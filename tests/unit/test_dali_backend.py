"""DALI specifics: its own mxnet reader on repacked files, recovery from decode failures, the GPU path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sface_dist.data.convert import EncodeOptions, folder_to_rec, repack
from sface_dist.data.images import encode_jpeg
from sface_dist.data.loader import build_loader
from sface_dist.data.recordio import FaceRecordIndex, RecordIOReader
from sface_dist.data.synthetic import SyntheticFaces, write_identity_folders

from loader_datasets import SIZE, bad_dataset, config, epoch

dali = pytest.importorskip("nvidia.dali")


def test_dali_mxnet_reader_reads_a_repacked_file(tmp_path: Path) -> None:
    """``repack`` writes the layout ``fn.readers.mxnet`` needs: every record an image with a scalar label."""
    from nvidia.dali import fn, pipeline_def, types

    faces = SyntheticFaces(3, image_size=32)
    write_identity_folders(faces, tmp_path / "folders", 4, range(3), suffix=".png")
    folder_to_rec(tmp_path / "folders", tmp_path / "src", progress=False, workers=0)
    repack(tmp_path / "src" / "train.rec", tmp_path / "flat", progress=False)

    @pipeline_def(batch_size=12, num_threads=1, device_id=None)
    def read_all() -> tuple[object, object]:
        encoded, labels = fn.readers.mxnet(
            path=[str(tmp_path / "flat" / "train.rec")], index_path=[str(tmp_path / "flat" / "train.idx")]
        )
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB), labels

    pipeline = read_all()
    pipeline.build()
    images, labels = pipeline.run()
    by_dali = sorted((int(labels.at(i)[0]), np.asarray(images.at(i)).tobytes()) for i in range(12))
    with RecordIOReader(tmp_path / "flat" / "train.rec", tmp_path / "flat" / "train.idx") as reader:
        index = FaceRecordIndex(reader)
        by_pil = sorted(
            (label, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes())
            for label, data in (index.read(i) for i in range(12))
        )
    assert [label for label, _ in by_dali] == [0] * 4 + [1] * 4 + [2] * 4
    for (label, pixels), (label2, pixels2) in zip(by_dali, by_pil, strict=True):
        assert label == label2
        difference = np.abs(np.frombuffer(pixels, np.uint8).astype(int) - np.frombuffer(pixels2, np.uint8))
        assert difference.max() <= 2  # both are libjpeg-turbo; IDCT settings may differ by a level


def test_dali_skips_what_torch_skips(tmp_path: Path) -> None:
    """Decode failures (truncated PNG, wrong size) rebuild the pipeline and resume with identical batches."""
    root, _ = bad_dataset(tmp_path)
    for rank in range(2):
        loaders = [
            build_loader(config(root, backend=backend, batch_size=3, on_bad_record="skip"), rank, 2, seed=6)
            for backend in ("torch", "dali")
        ]
        by_torch, by_dali = (epoch(loader, 2) for loader in loaders)
        assert len(by_torch) == len(by_dali) == 2
        for (x, y), (x2, y2) in zip(by_torch, by_dali, strict=True):
            assert torch.equal(y, y2)
            torch.testing.assert_close(x, x2, rtol=0, atol=1e-6)
        assert loaders[0].skipped_records == loaders[1].skipped_records


def test_dali_decodes_jpeg_like_pil(tmp_path: Path) -> None:
    faces = SyntheticFaces(2, image_size=SIZE * 4)
    write_identity_folders(faces, tmp_path / "folders", 6, range(2), suffix=".png")
    folder_to_rec(tmp_path / "folders", tmp_path, EncodeOptions(image_size=SIZE * 4), progress=False, workers=0)
    cfg = {"image_size": SIZE * 4, "batch_size": 6}
    by_torch = epoch(build_loader(config(tmp_path, **cfg), 0, 1, seed=0), 0)
    by_dali = epoch(build_loader(config(tmp_path, backend="dali", **cfg), 0, 1, seed=0), 0)
    for (x, y), (x2, y2) in zip(by_torch, by_dali, strict=True):
        assert torch.equal(y, y2)
        assert (x - x2).abs().max() <= 2.5 / 127.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mixed (GPU) decoder needs CUDA")
def test_mixed_decoder_on_gpu_matches_cpu(tmp_path: Path) -> None:
    images = [np.full((SIZE * 4, SIZE * 4, 3), 40 * i, np.uint8) for i in range(4)]
    (tmp_path / "folders" / "a").mkdir(parents=True)
    for i, image in enumerate(images):
        (tmp_path / "folders" / "a" / f"{i}.jpg").write_bytes(encode_jpeg(image))
    folder_to_rec(tmp_path / "folders", tmp_path, EncodeOptions(image_size=SIZE * 4), progress=False, workers=0)
    cfg = config(tmp_path, backend="dali", image_size=SIZE * 4)
    loader = build_loader(cfg, 0, 1, seed=0, device=torch.device("cuda"))
    ((x, _),) = epoch(loader, 0)
    assert x.is_cuda and loader.device_id is not None  # type: ignore[attr-defined]
    reference = epoch(build_loader(config(tmp_path, image_size=SIZE * 4), 0, 1, seed=0), 0)[0][0]
    assert (x.cpu() - reference).abs().max() <= 3 / 127.5
