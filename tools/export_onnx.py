"""Export a checkpoint's backbone to ONNX: ``python tools/export_onnx.py --checkpoint RUN --out model.onnx``.

The model takes raw 0-255 RGB crops ``[batch, 3, 112, 112]`` (normalisation inside the
graph) and works as a drop-in for OpenCV's ``cv2.FaceRecognizerSF``. Before the file
is written, onnxruntime must reproduce PyTorch's embeddings (cosine >= 0.9999 each).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sface_dist.cli import run_cli
from sface_dist.export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, export_checkpoint


def export(args: argparse.Namespace) -> int:
    loaded, check = export_checkpoint(args.checkpoint, args.out, args.opset)
    print(
        f"exported {loaded.description} -> "
        f"{args.out} ({args.out.stat().st_size / 2**20:.1f} MiB, opset {check.opset}); onnxruntime vs PyTorch "
        f"on batches of {list(check.batch_sizes)}: min cosine {check.min_cosine:.7f}, "
        f"max |diff| {check.max_abs_diff:.2e}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True,
        help="training checkpoint (step dir, run dir, checkpoints dir or its 'latest') or insightface's backbone file"
    )
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    args = parser.parse_args(argv)
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        parser.error(f"--opset must be from {MIN_OPSET} to {MAX_OPSET}")
    if args.out.is_dir():
        parser.error(f"--out {args.out}: a folder: name the .onnx file to write")
    return run_cli(lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
