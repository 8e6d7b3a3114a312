"""What the evaluation tools share: the model arguments (``--checkpoint`` | ``--onnx``, the device, the batch).

Their errors and exit statuses follow ``sface_dist.cli``.
"""

from __future__ import annotations

import argparse

import torch

from sface_dist.evaluation.embedder import ONNX_INPUTS, ModelSource, open_model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(parser: argparse.ArgumentParser, batch_size: int = 128) -> None:
    """``--checkpoint`` | ``--onnx``, ``--device`` and ``--batch-size``."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="training checkpoint (step dir, run dir, checkpoints dir or its 'latest') "
                       "or insightface's saved backbone (arcface_torch's model.pt)")
    model.add_argument("--onnx", help="exported ONNX model (tools/export_onnx.py)")
    parser.add_argument("--onnx-input", choices=ONNX_INPUTS, default="auto",
                        help="what --onnx takes: 0-255 pixels (raw: the project's exports), (x - 127.5) / 127.5 "
                             "(normalized: insightface's models), or read from the graph (default: %(default)s)")
    parser.add_argument("--device", default=default_device(), help="PyTorch device (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per batch (default: %(default)s)")


def open_model_from_args(args: argparse.Namespace) -> ModelSource:
    return open_model(args.checkpoint, args.onnx, args.device, args.onnx_input)
