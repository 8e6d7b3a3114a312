"""ONNX export: a backbone that takes raw 0-255 RGB crops, checked against PyTorch on export.

The graph maps input ``input`` float32 ``[batch, 3, 112, 112]`` (RGB, 0-255, dynamic
batch) to output ``embedding`` float32 ``[batch, D]``, un-normalised. The training pixel
normalisation ``(x - 127.5) / 127.5`` (``sface_dist/data/pixels.py``) is inside the graph, so the file is a drop-in
for OpenCV's ``cv2.FaceRecognizerSF``: its ``feature()`` feeds exactly that tensor
(``blobFromImage`` with scale 1 and BGR->RGB) and its ``match()`` L2-normalises.
The exporter is ``torch.export`` based (``dynamo=True``), the one PyTorch maintains.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sface_dist.atomic_write import atomic_write_text, publish_file, temporary_sibling
from sface_dist.data.pixels import normalize_pixels
from sface_dist.evaluation.checkpoint_backbone import LoadedBackbone, load_backbone
from sface_dist.evaluation.embedder import OnnxEmbedder
from sface_dist.file_digest import file_record, sidecar, sidecar_line

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
MIN_OPSET = 17
DEFAULT_OPSET = 18
MAX_OPSET = 23
"""The newest opset PyTorch's exporter writes (``torch.onnx._constants.ONNX_MAX_OPSET`` in torch 2.13)."""
MIN_COSINE = 0.9999
"""Each checked embedding of the ONNX model must have at least this cosine to PyTorch's."""


class ExportError(ValueError):
    """An ONNX model that does not reproduce the PyTorch backbone it was exported from."""


class PixelNormalized(nn.Module):
    """``backbone`` behind insightface's pixel normalisation: raw 0-255 RGB in, embedding out."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(normalize_pixels(pixels))


@dataclass(frozen=True)
class ExportCheck:
    """onnxruntime against PyTorch on random crops at several batch sizes, and the opset the file holds."""

    min_cosine: float
    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    opset: int


def export_onnx(
    backbone: nn.Module,
    path: str | os.PathLike[str],
    image_size: int = 112,
    opset: int = DEFAULT_OPSET,
    check_batch_sizes: tuple[int, ...] = (1, 4),
) -> ExportCheck:
    """Write ``backbone`` (in eval mode, on the CPU) as ONNX to ``path`` and check it with onnxruntime.

    The file appears only once the check has passed (temporary name, then rename), followed by its SHA-256 in
    ``NAME.sha256`` (``sha256sum`` format), which the evaluation tools check before they load the model.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be from {MIN_OPSET} to {MAX_OPSET}, got {opset}")
    path = Path(path)
    model = PixelNormalized(backbone).cpu().eval()
    example = torch.randint(0, 256, (2, 3, image_size, image_size)).float()
    temporary = temporary_sibling(path)
    try:
        temporary.touch()  # before minutes of export: the folder exists and takes a file
    except OSError as error:
        raise ExportError(f"{path}: cannot be written there: {(error.strerror or str(error)).lower()}") from None
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed": irrelevant to a backbone
    try:
        with warnings.catch_warnings():
            # torch.export calls its own deprecated pytree API: nothing for the caller to act on.
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
            torch.onnx.export(
                model,
                (example,),
                str(temporary),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
        try:
            written = _opset_of(temporary)
            if written != opset:
                raise ExportError(f"opset {opset} was asked for, the exporter wrote {written} (it writes "
                                  f"{MIN_OPSET} to {MAX_OPSET})")
            check = _check_onnx(temporary, model, image_size, check_batch_sizes, written)
        except ExportError as error:
            raise ExportError(f"{path}: {error}; the file was not written") from None
        record = file_record(temporary)
        sidecar(path).unlink(missing_ok=True)
        publish_file(temporary, path)
        atomic_write_text(sidecar(path), sidecar_line(path, record))
    finally:
        registration_log.setLevel(previous_level)
        temporary.unlink(missing_ok=True)
    return check


def _opset_of(path: Path) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def _check_onnx(
    path: Path, model: nn.Module, image_size: int, batch_sizes: tuple[int, ...], opset: int
) -> ExportCheck:
    """Compare onnxruntime with ``model`` (raw-pixel input) on random crops; raise below ``MIN_COSINE``."""
    onnx_model = OnnxEmbedder(path, verify=False, convention="raw")
    generator = torch.Generator().manual_seed(0)
    cosines, differences = [], []
    for batch_size in batch_sizes:
        pixels = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=generator, dtype=torch.uint8)
        with torch.no_grad():
            expected = model(pixels.float()).double()
        actual = onnx_model(pixels).double()
        if actual.shape != expected.shape:
            raise ExportError(f"ONNX output {list(actual.shape)} != PyTorch {list(expected.shape)}")
        cosines.append(torch.nn.functional.cosine_similarity(actual, expected, dim=1))
        differences.append((actual - expected).abs().max().reshape(1))
    min_cosine = float(torch.cat(cosines).min())
    check = ExportCheck(min_cosine, float(torch.cat(differences).max()), batch_sizes, opset)
    if not np.isfinite(min_cosine) or min_cosine < MIN_COSINE:
        raise ExportError(f"onnxruntime disagrees with PyTorch: cosine {min_cosine:.6f} < {MIN_COSINE}")
    return check


def export_checkpoint(
    checkpoint: str | os.PathLike[str], path: str | os.PathLike[str], opset: int = DEFAULT_OPSET
) -> tuple[LoadedBackbone, ExportCheck]:
    """Export the backbone of a training checkpoint (any path ``load_backbone`` accepts)."""
    loaded = load_backbone(checkpoint)
    image_size = int(loaded.config.get("data", {}).get("image_size", 112))
    return loaded, export_onnx(loaded.model, path, image_size, opset)
