"""ONNX export: raw-pixel graph, onnxruntime and OpenCV FaceRecognizerSF against PyTorch, checkpoint paths."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from sface_dist.backbones import build_backbone
from sface_dist.backbones.iresnet import IResNet
from sface_dist.backbones.mobilefacenet import MobileFaceNet
from sface_dist.checkpoint import MANIFEST, save_checkpoint
from sface_dist.config import Config, ModelConfig, to_dict
from sface_dist.data.synthetic import SyntheticFaces
from sface_dist.evaluation.checkpoint_backbone import CheckpointError, load_backbone, resolve_checkpoint
from sface_dist.evaluation.embedder import OnnxEmbedder
from sface_dist.export import MIN_COSINE, ExportError, export_checkpoint, export_onnx
from sface_dist.heads import ShardedSFaceHead, ShardOptimizer

ROOT = Path(__file__).resolve().parents[2]
EMBEDDING_SIZE = 32


def trained_looking_backbone() -> nn.Module:
    torch.manual_seed(0)
    return with_batchnorm_statistics(build_backbone("tiny", EMBEDDING_SIZE))


def with_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm statistics, so that eval-mode export matters."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def write_run(run: Path, model: nn.Module, step: int = 12) -> Path:
    """A run directory with one checkpoint in the trainer's layout."""
    config = to_dict(Config(model=ModelConfig(backbone="tiny", embedding_size=EMBEDDING_SIZE)))
    head = ShardedSFaceHead(4, EMBEDDING_SIZE, impl="dense")
    state = {"step": step, "backbone": model.state_dict(), "backbone_optimizer": {}, "rng": {}, "progress": {}}
    return save_checkpoint(
        run / "checkpoints",
        rank=0,
        world_size=1,
        trainer_state=state,
        head_state=head.state_dict(),
        head_optimizer_state=ShardOptimizer(head, lr=0.1).state_dict(),
        num_classes=4,
        config=config,
    )


def run_export_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "tools/export_onnx.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def face_crops(count: int, seed: int = 0) -> np.ndarray:
    """Aligned synthetic faces, uint8 RGB ``[count, 112, 112, 3]``."""
    faces = SyntheticFaces(count, seed=seed)
    return np.stack([faces.render(identity, 0) for identity in range(count)])


def torch_embeddings(model: nn.Module, rgb: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(rgb).permute(0, 3, 1, 2).double()
    with torch.no_grad():
        return model.double()((pixels - 127.5) / 127.5).float()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """The tiny backbone, its run directory and its ONNX export (through the checkpoint)."""
    folder = tmp_path_factory.mktemp("export")
    model = trained_looking_backbone()
    write_run(folder / "run", model)
    onnx_path = folder / "tiny.onnx"
    export_checkpoint(folder / "run", onnx_path)
    return model, folder / "run", onnx_path


def test_graph_has_dynamic_batch_and_a_recent_opset(exported: tuple[nn.Module, Path, Path]) -> None:
    graph = onnx.load(str(exported[2]))
    onnx.checker.check_model(graph)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inputs,), (outputs,) = graph.graph.input, graph.graph.output
    input_dims = [d.dim_param or d.dim_value for d in inputs.type.tensor_type.shape.dim]
    output_dims = [d.dim_param or d.dim_value for d in outputs.type.tensor_type.shape.dim]
    assert (inputs.name, outputs.name) == ("input", "embedding")
    assert isinstance(input_dims[0], str) and input_dims[1:] == [3, 112, 112]
    assert output_dims == [input_dims[0], EMBEDDING_SIZE]


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_onnxruntime_matches_pytorch_on_raw_pixels(exported: tuple[nn.Module, Path, Path], batch_size: int) -> None:
    model, _, onnx_path = exported
    crops = face_crops(batch_size, seed=batch_size)
    expected = torch_embeddings(model, crops)
    actual = OnnxEmbedder(onnx_path)(torch.from_numpy(crops).permute(0, 3, 1, 2))
    cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=1)
    assert cosine.min() >= MIN_COSINE
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_opencv_face_recognizer_sf_is_a_drop_in(exported: tuple[nn.Module, Path, Path]) -> None:
    model, _, onnx_path = exported
    crops = face_crops(6, seed=1)
    reference = torch.nn.functional.normalize(torch_embeddings(model, crops).double(), dim=1)
    recognizer = cv2.FaceRecognizerSF.create(str(onnx_path), "")
    features = [recognizer.feature(np.ascontiguousarray(rgb[:, :, ::-1])) for rgb in crops]  # OpenCV images are BGR
    assert features[0].shape == (1, EMBEDDING_SIZE)
    for i in range(len(crops)):
        for j in range(i + 1, len(crops)):
            expected_cosine = float(reference[i] @ reference[j])
            cosine = recognizer.match(features[i], features[j], cv2.FaceRecognizerSF_FR_COSINE)
            distance = recognizer.match(features[i], features[j], cv2.FaceRecognizerSF_FR_NORM_L2)
            assert cosine == pytest.approx(expected_cosine, abs=1e-5)
            assert distance == pytest.approx(float((reference[i] - reference[j]).norm()), abs=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: IResNet((1, 1, 1, 1), EMBEDDING_SIZE, dropout=0.2),
        lambda: MobileFaceNet(EMBEDDING_SIZE, blocks=(1, 1, 1, 1), scale=1),
    ],
    ids=["iresnet", "mobilefacenet"],
)
def test_real_architectures_export_for_onnxruntime_and_opencv(tmp_path: Path, make: Callable[[], nn.Module]) -> None:
    """Shallow IResNet and MobileFaceNet: every layer type of the full-size models (grouped convs, residuals, GDC)."""
    model = with_batchnorm_statistics(make())
    path = tmp_path / "model.onnx"
    check = export_onnx(model, path)
    assert check.min_cosine >= MIN_COSINE and check.batch_sizes == (1, 4)
    crops = face_crops(2, seed=4)
    expected = torch_embeddings(model, crops)
    recognizer = cv2.FaceRecognizerSF.create(str(path), "")
    features = torch.from_numpy(np.concatenate([recognizer.feature(np.ascontiguousarray(c[..., ::-1])) for c in crops]))
    assert torch.nn.functional.cosine_similarity(features, expected, dim=1).min() >= MIN_COSINE


def test_export_refuses_a_model_onnxruntime_does_not_reproduce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = OnnxEmbedder.__call__

    def perturbed(self: OnnxEmbedder, images: torch.Tensor) -> torch.Tensor:
        embeddings = original(self, images)
        return embeddings + 0.5 * embeddings.norm(dim=1, keepdim=True) * torch.randn_like(embeddings)

    monkeypatch.setattr(OnnxEmbedder, "__call__", perturbed)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=rf"^{path}: onnxruntime disagrees with PyTorch: cosine .* not written"):
        export_onnx(trained_looking_backbone(), path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- checkpoint paths


def test_every_checkpoint_path_form_resolves(exported: tuple[nn.Module, Path, Path]) -> None:
    model, run, _ = exported
    step_dir = run / "checkpoints" / "step-00000012"
    for path in (step_dir, run / "checkpoints", run / "checkpoints" / "latest", run):
        assert resolve_checkpoint(path) == step_dir
    loaded = load_backbone(run)
    assert (loaded.step, loaded.backbone, loaded.embedding_size) == (12, "tiny", EMBEDDING_SIZE)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor.to(loaded.model.state_dict()[name].dtype))


def test_a_checkpoint_without_config_is_a_clear_error(tmp_path: Path) -> None:
    step_dir = write_run(tmp_path / "run", trained_looking_backbone())
    manifest = json.loads((step_dir / MANIFEST).read_text())
    del manifest["config"]
    (step_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"^{step_dir / MANIFEST}: the manifest holds no 'config'"):
        export_checkpoint(tmp_path / "run", tmp_path / "out.onnx")
    result = run_export_tool("--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {step_dir / MANIFEST}: the manifest holds no 'config'")
    assert not (tmp_path / "x.onnx").exists()


def test_paths_that_are_not_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no such checkpoint directory"):
        load_backbone(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"not a checkpoint: expected a step directory with manifest.json"):
        load_backbone(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match=r"latest names step-00000009, which has no manifest.json"):
        load_backbone(tmp_path)


def test_export_tool_writes_a_checked_model(exported: tuple[nn.Module, Path, Path], tmp_path: Path) -> None:
    _, run, _ = exported
    out = tmp_path / "sface_tiny.onnx"
    result = run_export_tool("--checkpoint", str(run / "checkpoints" / "latest"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"exported tiny ({EMBEDDING_SIZE}-d) from {run / 'checkpoints' / 'step-00000012'}, step 12" in result.stdout
    assert re.search(r"min cosine (1\.0000000|0\.9999\d+)", result.stdout)
    assert onnx.load(str(out)).graph.output[0].name == "embedding"
    low = run_export_tool("--checkpoint", str(run), "--out", str(out), "--opset", "13")
    assert low.returncode == 2 and "--opset must be from 17 to 23" in low.stderr
