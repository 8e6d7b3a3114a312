"""What the evaluation tools share: model arguments and one-line error reports.

Errors in the user's input (files, checkpoints, packs, meta files, missing optional
packages, an output that cannot be written) end a tool with ``error: <file>: <problem>``
and exit status 2; ``SFACE_DEBUG=1`` shows the full traceback instead, as for
``sface_dist.train``. Ctrl-C ends it with ``interrupted`` and status 130: what it writes
is written whole or not at all, so running the same command again continues or redoes it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from sface_dist.cli import INTERRUPTED, describe_error
from sface_dist.evaluation.embedder import ModelSource, open_model

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(parser: argparse.ArgumentParser, batch_size: int = 128) -> None:
    """``--checkpoint`` | ``--onnx``, ``--device`` and ``--batch-size``."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="training checkpoint: step dir, run dir, checkpoints dir or its 'latest'")
    model.add_argument("--onnx", help="exported ONNX model (tools/export_onnx.py)")
    parser.add_argument("--device", default=default_device(), help="PyTorch device (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per batch (default: %(default)s)")


def open_model_from_args(args: argparse.Namespace) -> ModelSource:
    return open_model(args.checkpoint, args.onnx, args.device)


def run_tool(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``main(args)``, with user errors reported as one line on stderr (exit status 2) and Ctrl-C as
    ``interrupted`` (130)."""
    try:
        return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    except USER_ERRORS as error:
        if os.environ.get("SFACE_DEBUG"):
            raise
        print(f"error: {describe_error(error)}", file=sys.stderr, flush=True)
        return 2
