"""Compile the fused SFace kernels for a GPU architecture, here, without a GPU, and print what they take.

    python tools/compile_kernels.py                                   # default tiles, every precision
    python tools/compile_kernels.py --precisions bf16 --tiles 64x32x8x2,32x16x8x2,16x16x8x2

One row per (tiles, precision, kernel): registers per thread, bytes spilled to local memory per
thread, spill loads/stores inside loops (paid every iteration; read from the SASS), and shared
memory per block against the architecture's limit. Tiles are
BLOCK_B x BLOCK_C x WARPS x STAGES, as ``tools/bench_head.py --tiles`` takes them; the default is
each precision's ``CUDA_TILES`` entry. Exits 1 if any kernel fails to compile or exceeds the
shared-memory limit (it could not launch).
"""

from __future__ import annotations

import argparse
import sys

from sface_dist.heads.kernels.fused import CUDA_TILES, TileConfig
from sface_dist.heads.kernels.offline_compile import SHARED_MEMORY_LIMIT, OfflineCompileError, compile_kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", default=None, help="comma-separated BxCxWARPSxSTAGES (default: per precision)")
    parser.add_argument("--precisions", default=",".join(CUDA_TILES), help="comma-separated operand precisions")
    parser.add_argument("--dim", type=int, default=512, help="embedding size (default 512)")
    parser.add_argument("--sparse", action="store_true", help="compile sparse mode with Partial-FC scales")
    parser.add_argument("--capability", type=int, default=90, choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capability (default 90: H100/H200)")  # fmt: skip
    args = parser.parse_args(argv)

    import triton

    limit = SHARED_MEMORY_LIMIT[args.capability]
    print(f"# sm_{args.capability}, Triton {triton.__version__}, D={args.dim}, {'sparse' if args.sparse else 'exact'}"
          f" mode; shared-memory limit {limit // 1024} KiB per block")  # fmt: skip
    print(f"{'tiles':>12} {'precision':>9} {'kernel':>24} {'registers':>9} {'spill B':>8} {'loop spills':>11} "
          f"{'shared KiB':>10}")  # fmt: skip
    failures = 0
    for precision in args.precisions.split(","):
        tile_texts = args.tiles.split(",") if args.tiles else [None]
        for text in tile_texts:
            tiles = TileConfig.parse(text) if text else CUDA_TILES[precision]
            label = tiles.label
            try:
                kernels = compile_kernels(tiles, precision, args.dim, args.sparse, args.sparse, args.capability)
            except OfflineCompileError as error:
                print(f"{label:>12} {precision:>9}  does not compile: {error}")
                failures += 1
                continue
            for kernel in kernels:
                over = kernel.shared_bytes > limit
                failures += over
                note = "  over the limit: cannot launch" if over else ""
                print(f"{label:>12} {precision:>9} {kernel.kernel:>24} {kernel.registers:>9} {kernel.spill_bytes:>8} "
                      f"{kernel.loop_spill_instructions:>11} {kernel.shared_bytes / 1024:>10.1f}{note}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
