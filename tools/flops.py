"""Parameters and multiply-accumulates (the "FLOPs" of face-recognition tables) of each backbone at 112x112.

    python tools/flops.py                        # every backbone
    python tools/flops.py iresnet50 vit_t --embedding-size 256

Counted without running anything (``sface_dist/backbones/complexity.py``): convolutions and matrix products
only, one multiply-accumulate per multiply-add, for one image; GFLOPs in the strict sense are twice the GMACs.
"""

from __future__ import annotations

import argparse
import sys

from sface_dist.backbones import BACKBONES
from sface_dist.backbones.complexity import measure
from sface_dist.cli import run_cli


def table(names: list[str], embedding_size: int, image_size: int) -> list[str]:
    lines = [f"{'backbone':14} {'params (M)':>10} {'GMACs':>8} {'GFLOPs':>8}   at {image_size}x{image_size}, "
             f"{embedding_size}-d embeddings"]
    for name in names:
        size = measure(name, embedding_size, image_size)
        lines.append(f"{name:14} {size.params / 1e6:10.2f} {size.macs / 1e9:8.3f} {2 * size.macs / 1e9:8.3f}")
    return lines


def report(args: argparse.Namespace) -> int:
    print("\n".join(table(args.backbones or list(BACKBONES), args.embedding_size, args.image_size)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbones", nargs="*", metavar="BACKBONE",
                        help=f"backbones to count (default: all of {', '.join(BACKBONES)})")
    parser.add_argument("--embedding-size", type=int, default=512, help="embedding size (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=112, help="input side (default: %(default)s)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.backbones if name not in BACKBONES]
    if unknown:
        parser.error(f"unknown backbone {unknown[0]!r}; known backbones: {', '.join(BACKBONES)}")
    return run_cli(lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
