"""Embedders: raw face crops in, embeddings out, from a PyTorch backbone or an exported ONNX model.

Every embedder maps uint8 RGB crops ``[B, 3, H, W]`` to float32 un-normalised
embeddings ``[B, D]`` on the CPU, so the protocols downstream do not care which
runtime produced them. PyTorch backbones see the pixels normalised as in training
(``sface_dist/data/pixels.py``). The project's exported models carry that normalisation in their graph and take
the raw pixels; others (insightface's released ONNX models) expect it done outside. ``OnnxEmbedder`` reads which
from the graph (``input_convention``), as insightface's own ``ArcFaceONNX`` does, unless told.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from sface_dist.console import warn
from sface_dist.data.pixels import normalize_pixels
from sface_dist.evaluation.checkpoint_backbone import load_backbone
from sface_dist.file_digest import DigestMismatch, file_record, sidecar, verify_against_sidecar
from sface_dist.progress_bar import ProgressBar


class Embedder(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``[B, 3, H, W]`` -> float32 ``[B, D]`` un-normalised embeddings on the CPU."""
        ...


class TorchEmbedder:
    """Runs ``model`` on ``device`` in eval mode without gradients, restoring its training mode after."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(normalize_pixels(images.to(self.device))).float().cpu()
        finally:
            self.model.train(was_training)


ONNX_INPUTS = ("auto", "raw", "normalized")
"""``--onnx-input``: read the convention from the graph, or feed 0-255 pixels, or ``(x - 127.5) / 127.5``."""
NORMALISING_OPS = ("Sub", "Mul", "Div")
"""Ops that open a graph which normalises its own input (``Sub`` then ``Div`` or ``Mul``)."""


def input_convention(path: Path, input_name: str) -> str:
    """``raw`` when the graph's input goes through a subtraction and then a division or multiplication before
    anything else (the model normalises the pixels itself), else ``normalized``."""
    import onnx

    nodes = list(onnx.load(str(path), load_external_data=False).graph.node)
    value, ops = input_name, []
    while len(ops) < 2:
        consumer = next((node for node in nodes if value in node.input and node.op_type != "Identity"), None)
        if consumer is None or consumer.op_type not in NORMALISING_OPS:
            break
        ops.append(consumer.op_type)
        value = consumer.output[0]
    return "raw" if len(ops) == 2 and ops[0] == "Sub" else "normalized"


class OnnxEmbedder:
    """An ONNX model run by onnxruntime, on CUDA when available.

    ``convention``: ``raw`` (0-255 RGB, the project's exports), ``normalized`` (``(x - 127.5) / 127.5`` done here,
    as insightface's models expect) or ``auto`` (read from the graph: ``input_convention``); ``self.convention`` is
    the one used.

    ``verify``: check the file against the ``NAME.sha256`` its export wrote beside it (refused when it differs;
    one line saying it is unverified when there is none).
    """

    def __init__(self, path: str | os.PathLike[str], verify: bool = True, convention: str = "auto") -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("ONNX models need onnxruntime: pip install 'sface_dist[export]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        if verify:
            try:
                verified = verify_against_sidecar(self.path)
            except DigestMismatch as error:
                raise ValueError(f"{error}: refused") from None
            if not verified:
                warn(f"{self.path}: no {sidecar(self.path).name} beside it: read unverified")
        preferred = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [name for name in preferred if name in onnxruntime.get_available_providers()]
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # fatal only: a failure is reported as one line naming the file, below
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable models
            raise ValueError(f"{self.path}: not a loadable ONNX model ({error})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{self.path}: expected one [B, 3, H, W] input, got {[i.shape for i in inputs]}")
        self.input_name = inputs[0].name
        if convention not in ONNX_INPUTS:
            raise ValueError(f"--onnx-input {convention}: expected one of {', '.join(ONNX_INPUTS)}")
        self.convention = input_convention(self.path, self.input_name) if convention == "auto" else convention

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (normalize_pixels(images) if self.convention == "normalized" else images.to(torch.float32)).numpy()
        try:
            output = self.session.run(None, {self.input_name: pixels})[0]
        except Exception as error:  # onnxruntime's own exception types: a graph that fails on real input
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise ValueError(f"{self.path}: the model failed on a batch of {len(pixels)} images: {reason}") from None
        if output.ndim != 2 or len(output) != len(pixels):
            raise ValueError(f"{self.path}: expected embeddings [{len(pixels)}, D] for {len(pixels)} images, got "
                             f"{list(output.shape)}")
        return torch.from_numpy(output.astype(np.float32))


def embed_views(
    embed: Embedder, images: torch.Tensor, batch_size: int, flip: bool = True, progress: ProgressBar | None = None
) -> torch.Tensor:
    """Embeddings ``[V, M, D]`` of uint8 ``images [M, 3, H, W]``: views (image, mirror), or the image alone."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images [M, 3, H, W], got {images.dtype} {list(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batches.append(torch.stack([embed(view) for view in ((batch, batch.flip(3)) if flip else (batch,))]))
        if progress is not None:
            progress.update(len(batch))
    if not batches:
        raise ValueError("no images to embed")
    return torch.cat(batches, dim=1)


def embed_images(embed: Embedder, images: torch.Tensor, batch_size: int, flip: bool = True) -> torch.Tensor:
    """Embeddings ``[M, D]``; with ``flip``, embedding(image) + embedding(mirror) as insightface does."""
    return embed_views(embed, images, batch_size, flip).sum(0)


@dataclass(frozen=True)
class ModelSource:
    """An embedder with a human-readable name and an identity for caches of its embeddings."""

    embed: Embedder
    description: str
    fingerprint: dict[str, Any]

    @property
    def cache_key(self) -> str:
        """A short stable hash of ``fingerprint``: embeddings cached under it belong to this model."""
        text = repr(sorted(self.fingerprint.items()))
        return hashlib.sha1(text.encode()).hexdigest()[:12]


INPUT_DESCRIPTIONS = {"raw": "0-255 pixels, normalised inside the graph",
                      "normalized": "pixels normalised outside the graph, (x - 127.5) / 127.5"}


def open_model(
    checkpoint: str | os.PathLike[str] | None,
    onnx: str | os.PathLike[str] | None,
    device: torch.device | str,
    onnx_input: str = "auto",
) -> ModelSource:
    """The model a CLI names: a training checkpoint or insightface's weights (``--checkpoint``), or an ONNX file
    (``--onnx``, fed as ``onnx_input`` says: ``OnnxEmbedder``)."""
    if onnx is not None and checkpoint is None:
        path = Path(onnx).resolve()
        embedder = OnnxEmbedder(path, convention=onnx_input)
        how = "read from the graph" if onnx_input == "auto" else "--onnx-input"
        description = f"ONNX {path} (input: {INPUT_DESCRIPTIONS[embedder.convention]}; {how})"
        return ModelSource(embedder, description, {**_file_identity(path), "input": embedder.convention})
    if checkpoint is not None and onnx is None:
        loaded = load_backbone(checkpoint)
        embedder = TorchEmbedder(loaded.model.to(device), device)
        return ModelSource(embedder, loaded.description, _file_identity(loaded.weights_file.resolve()))
    raise ValueError("name exactly one model: a checkpoint or an ONNX file")


def _file_identity(path: Path) -> dict[str, Any]:
    """The weights file's size and SHA-256: the same weights have the same identity wherever they lie, and any
    change to them changes it."""
    return file_record(path)
