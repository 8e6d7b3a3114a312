"""The evaluation CLIs: eval_verification.py on a checkpoint and on its ONNX export, embed.py, error lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sface_dist.backbones import build_backbone
from sface_dist.checkpoint import save_backbone
from sface_dist.data.bin_pack import read_bin, write_bin
from sface_dist.data.convert import folder_to_rec
from sface_dist.data.images import encode_jpeg
from sface_dist.data.synthetic import SyntheticFaces, write_identity_folders
from sface_dist.evaluation.embedder import TorchEmbedder, embed_views
from sface_dist.evaluation.verification import verification_accuracy
from sface_dist.export import export_onnx

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """A tiny backbone saved as a best-backbone checkpoint, and its ONNX export."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(1)
    model = build_backbone("tiny", 24).eval()
    config = {"model": {"backbone": "tiny", "embedding_size": 24}}
    checkpoint = save_backbone(folder / "best", model, {"step": 3, "config": config})
    export_onnx(model, folder / "tiny.onnx")
    return model, checkpoint, folder / "tiny.onnx"


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, issame = SyntheticFaces(1, seed=2).render_pairs(range(12), 40, seed=0)
    path = tmp_path_factory.mktemp("packs") / "heldout.bin"
    write_bin(path, [encode_jpeg(image) for image in images], issame)
    return path


def test_eval_verification_on_checkpoint_and_onnx_agree(
    model_files: tuple[nn.Module, Path, Path], pack_path: Path, tmp_path: Path
) -> None:
    model, checkpoint, onnx_path = model_files
    pack = read_bin(pack_path)
    expected = verification_accuracy(embed_views(TorchEmbedder(model), pack.images, 64), pack.issame)
    reports = {}
    for flag, path in (("--checkpoint", checkpoint), ("--onnx", onnx_path)):
        out = tmp_path / f"{flag[2:]}.json"
        arguments = [flag, str(path), "--bin", str(pack_path), "--json", str(out), "--device", "cpu", "--quiet"]
        result = run_tool("tools/eval_verification.py", *arguments)
        assert result.returncode == 0, result.stderr
        assert "| pack | pairs | accuracy (%) |" in result.stdout
        assert f"| heldout | 40 | {100 * expected.accuracy:.2f} ± {100 * expected.std:.2f} |" in result.stdout
        reports[flag] = json.loads(out.read_text())["packs"]["heldout"]
    for report in reports.values():
        assert report["accuracy"] == expected.accuracy and report["threshold"] == expected.threshold
        assert report["tar_at_far"] == {f"{far:.0e}": tar for far, tar in expected.tar_at_far.items()}
        assert report["xnorm"] == pytest.approx(expected.xnorm, rel=1e-5)


def test_eval_verification_given_a_folder_for_a_pack_names_the_packs_inside(
    model_files: tuple[nn.Module, Path, Path], pack_path: Path
) -> None:
    result = run_tool("tools/eval_verification.py", "--onnx", str(model_files[2]), "--bin", str(pack_path.parent))
    assert result.returncode == 1
    assert result.stderr == (f"error: {pack_path.parent}: a folder, not a verification pack: name the .bin file (it "
                             "holds heldout.bin)\n")


def test_eval_verification_reports_a_bad_pack_in_one_line(
    model_files: tuple[nn.Module, Path, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x80\x02cos\nsystem\nq\x00.")
    result = run_tool("tools/eval_verification.py", "--onnx", str(model_files[2]), "--bin", str(bad))
    assert result.returncode == 1
    assert result.stderr == f"error: {bad}: not a readable verification pack: refused global os.system\n"


def test_embed_folder_resizes_with_a_warning(model_files: tuple[nn.Module, Path, Path], tmp_path: Path) -> None:
    model, checkpoint, _ = model_files
    faces = SyntheticFaces(3, seed=5)
    write_identity_folders(faces, tmp_path / "faces", 2, range(3))
    large = Image.fromarray(faces.render(0, 9)).resize((150, 150), Image.Resampling.BILINEAR)
    large.save(tmp_path / "faces" / "000000" / "big.png")
    out = tmp_path / "out" / "faces.npy"
    arguments = ["--checkpoint", str(checkpoint), "--folder", str(tmp_path / "faces"), "--out", str(out)]
    result = run_tool("tools/embed.py", *arguments, "--normalize", "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "warning: resized 1 of 7 images to 112x112" in result.stderr
    names = out.with_suffix(".txt").read_text().splitlines()
    assert names == [f"{identity:06d}/{name}.png" for identity, name in
                     [(0, "0000"), (0, "0001"), (0, "big"), (1, "0000"), (1, "0001"), (2, "0000"), (2, "0001")]]
    images = []
    for name in names:
        with Image.open(tmp_path / "faces" / name) as image:
            images.append(np.asarray(image.convert("RGB").resize((112, 112), Image.Resampling.BILINEAR)))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    expected = torch.nn.functional.normalize(embed_views(TorchEmbedder(model), pixels, 8).sum(0), dim=1)
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_embed_rec_lists_keys_and_labels(model_files: tuple[nn.Module, Path, Path], tmp_path: Path) -> None:
    model, _, onnx_path = model_files
    faces = SyntheticFaces(3, seed=6)
    write_identity_folders(faces, tmp_path / "faces", 2, range(3))
    folder_to_rec(tmp_path / "faces", tmp_path / "data", progress=False)
    out = tmp_path / "rec.npy"
    arguments = ["--onnx", str(onnx_path), "--rec", str(tmp_path / "data" / "train.rec"), "--out", str(out)]
    result = run_tool("tools/embed.py", *arguments, "--no-flip", "--quiet")
    assert result.returncode == 0, result.stderr
    assert out.with_suffix(".txt").read_text().splitlines() == [f"{key}\t{key - 1 >> 1}" for key in range(1, 7)]
    decoded = [faces.render(label, sample) for label in range(3) for sample in range(2)]
    pixels = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    expected = embed_views(TorchEmbedder(model), pixels, 8, flip=False)[0]
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(np.load(out)), expected, dim=1)
    assert cosine.min() > 0.99  # JPEG in the .rec vs the PNG originals
    by_folder = tmp_path / "folder.npy"
    result = run_tool("tools/embed.py", "--onnx", str(onnx_path), "--rec", str(tmp_path / "data"), "--out",
                      str(by_folder), "--no-flip", "--quiet")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(by_folder), np.load(out))
    assert by_folder.with_suffix(".txt").read_text() == out.with_suffix(".txt").read_text()


def test_embed_names_a_folder_without_a_dataset(model_files: tuple[nn.Module, Path, Path], tmp_path: Path) -> None:
    _, _, onnx_path = model_files
    result = run_tool("tools/embed.py", "--onnx", str(onnx_path), "--rec", str(tmp_path), "--out",
                      str(tmp_path / "out.npy"), "--quiet")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path}: the dataset folder holds no train.rec"
