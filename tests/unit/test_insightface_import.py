"""arcface_torch's backbones load as they are, checked against what insightface's own code computed
(tests/golden/insightface: written by make_golden.py with insightface's iresnet.py and mobilefacenet.py).

The golden weights are rebuilt here from their names (tests/support/insightface_weights.py), saved the way
arcface_torch saves them, and read back through the tools' loader; the project's model must give insightface's
outputs to 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from insightface_weights import filled, inputs

from sface_dist.backbones import build_backbone
from sface_dist.backbones.insightface import identify
from sface_dist.evaluation.checkpoint_backbone import load_backbone

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "insightface"

EXPECTED = json.loads((GOLDEN / "expected.json").read_text())["models"]


def insightface_state(key: str) -> dict[str, torch.Tensor]:
    """The golden state dict of arcface_torch's model ``key``, in insightface's order and shapes."""
    record = EXPECTED[key]
    model = build_backbone(record["backbone"], record["embedding_size"])
    assert [[name, list(t.shape)] for name, t in model.state_dict().items()] == record["state_dict"], key
    return filled(model.state_dict())


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_every_arcface_torch_model_is_identified_from_its_names_and_shapes(key: str) -> None:
    record = EXPECTED[key]
    state = insightface_state(key)
    assert identify(state, "model.pt") == (record["backbone"], record["embedding_size"])


@pytest.mark.parametrize("key", sorted(key for key, record in EXPECTED.items() if "outputs" in record))
def test_the_projects_model_gives_insightfaces_outputs(tmp_path: Path, key: str) -> None:
    """Saved as arcface_torch's model.pt (the bare state dict) and as its training checkpoint with DataParallel's
    prefix; both load through the tools' path and compute insightface's embeddings."""
    state = insightface_state(key)
    torch.save(state, tmp_path / "model.pt")
    torch.save({"state_dict_backbone": {f"module.{name}": t for name, t in state.items()}, "epoch": 3},
               tmp_path / "checkpoint_gpu_0.pt")
    expected = torch.tensor(EXPECTED[key]["outputs"], dtype=torch.float64)
    for file in ("model.pt", "checkpoint_gpu_0.pt"):
        loaded = load_backbone(tmp_path / file)
        assert loaded.description.endswith("(insightface weights)") and loaded.step is None
        with torch.no_grad():
            got = loaded.model(inputs()).double()
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5, file


def test_a_file_of_another_shape_is_one_line_naming_the_keys(tmp_path: Path) -> None:
    state = insightface_state("r18")
    del state["layer4.1.bn3.weight"]
    state["head.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(ValueError) as raised:
        load_backbone(tmp_path / "cut.pt")
    assert str(raised.value) == (f"{tmp_path / 'cut.pt'}: does not fit iresnet18 (512-d): missing: "
                                 "layer4.1.bn3.weight; unexpected: head.weight")
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt: not an arcface_torch iresnet \(r18-r200\) or mobilefacenet "
                       r"\(mbf\) state dict \(its first names: w\)$"):
        load_backbone(tmp_path / "other.pt")
    stages = {k: v for k, v in insightface_state("r18").items() if not k.startswith("layer3.1.")}
    torch.save(stages, tmp_path / "r17.pt")
    with pytest.raises(ValueError, match=r"r17.pt: an iresnet of \(2, 2, 1, 2\) blocks per stage, which is none"):
        load_backbone(tmp_path / "r17.pt")


def test_the_tools_take_insightface_weights(tmp_path: Path) -> None:
    """Export and evaluation name the weights as insightface's, and the export computes what the model does."""
    torch.save(insightface_state("mbf"), tmp_path / "backbone.pth")
    result = subprocess.run([sys.executable, "tools/export_onnx.py", "--checkpoint", str(tmp_path / "backbone.pth"),
                             "--out", str(tmp_path / "mbf.onnx")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"exported mobilefacenet (512-d) from {tmp_path / 'backbone.pth'} "
                                    "(insightface weights) -> ")


def insightface_style_onnx(model: torch.nn.Module, path: Path) -> Path:
    """The model exported as insightface's torch2onnx.py does: the bare network, whose input is the pixels
    already normalised outside the graph (input name ``data``)."""
    torch.onnx.export(model.eval(), torch.zeros(1, 3, 112, 112), str(path), input_names=["data"], opset_version=18,
                      dynamo=False, dynamic_axes={"data": {0: "batch"}})
    return path


def test_an_insightface_style_onnx_is_fed_normalised_pixels_and_matches_its_torch_twin(tmp_path: Path) -> None:
    """Read from the graph: insightface's ONNX models take (x - 127.5) / 127.5, the project's exports 0-255 pixels;
    each embeds a batch as the PyTorch model does, and feeding the other convention (--onnx-input) does not."""
    from sface_dist.evaluation.embedder import OnnxEmbedder, TorchEmbedder, open_model
    from sface_dist.export import export_onnx

    model = build_backbone("mobilefacenet", 128).eval()
    model.load_state_dict(filled(model.state_dict()))
    faces = torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = TorchEmbedder(model)(faces)
    theirs = insightface_style_onnx(model, tmp_path / "insightface.onnx")
    ours = tmp_path / "ours.onnx"
    export_onnx(model, ours, 112, 18)
    for path, convention in ((theirs, "normalized"), (ours, "raw")):
        embedder = OnnxEmbedder(path, verify=False)
        assert embedder.convention == convention, path
        assert torch.allclose(embedder(faces), expected, rtol=1e-4, atol=1e-4), path
    forced = OnnxEmbedder(theirs, verify=False, convention="raw")
    assert not torch.allclose(forced(faces), expected, rtol=1e-2, atol=1e-2)
    source = open_model(None, theirs, "cpu")
    assert source.description == (f"ONNX {theirs} (input: pixels normalised outside the graph, (x - 127.5) / 127.5; "
                                   "read from the graph)")
    assert open_model(None, theirs, "cpu", "raw").cache_key != source.cache_key
