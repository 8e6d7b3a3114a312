"""``tools/compare_faces.py`` against the cosine computed here from the same model's embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sface_dist.evaluation.checkpoint_backbone import load_backbone
from sface_dist.evaluation.embedder import TorchEmbedder

from training_runs import tool


def photos(folder: Path) -> list[Path]:
    gen = np.random.default_rng(0)
    paths = []
    for name in ("a.png", "b.png"):
        Image.fromarray(gen.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def reference_cosine(run: Path, first: Path, second: Path) -> float:
    """Each photo plus its mirror through the run's backbone, then their cosine in fp64."""
    embed = TorchEmbedder(load_backbone(run).model)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p)).transpose(2, 0, 1).copy())
                          for p in (first, second)])
    embeddings = embed(images) + embed(images.flip(3))
    return F.cosine_similarity(embeddings[:1].double(), embeddings[1:].double()).item()


def test_the_cosine_and_the_verdict(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = photos(tmp_path)
    cosine = reference_cosine(trained_run, first, second)
    compare = tool("compare_faces").main
    assert compare(["--checkpoint", str(trained_run), str(first), str(second)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"cosine {cosine:.4f}\n" and "step 4" in captured.err
    for threshold, verdict in ((cosine - 0.01, "the same person"), (cosine + 0.01, "different people")):
        assert compare(["--checkpoint", str(trained_run), str(first), str(second), "--threshold", str(threshold)]) == 0
        assert capsys.readouterr().out == f"cosine {cosine:.4f}: {verdict} (threshold {threshold:g})\n"
    assert compare(["--checkpoint", str(trained_run), str(first), str(first), "--threshold", "0.99"]) == 0
    assert capsys.readouterr().out == "cosine 1.0000: the same person (threshold 0.99)\n"


def test_a_photo_that_cannot_be_read_is_one_line(trained_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = photos(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert tool("compare_faces").main(["--checkpoint", str(trained_run), str(first), str(tmp_path / "broken.jpg")]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {tmp_path / 'broken.jpg'}: cannot read image")
