"""Build RecordIO face datasets: ``python tools/convert_rec.py from-folder ROOT OUT_DIR``."""

from __future__ import annotations

import argparse
import sys

from sface_dist.data.convert import ConvertError, folder_to_rec


def _from_folder(args: argparse.Namespace) -> int:
    summary = folder_to_rec(
        args.root,
        args.out_dir,
        quality=args.quality,
        image_size=args.image_size,
        progress=not args.quiet,
        workers=args.workers,
    )
    print(
        f"wrote {summary.out_dir}/train.rec ({summary.rec_bytes / 2**20:.1f} MiB), train.idx, property, classes.txt: "
        f"{summary.num_images} images of {summary.num_classes} identities in {summary.seconds:.1f} s "
        f"({summary.num_images / max(summary.seconds, 1e-9):,.0f} img/s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from_folder = commands.add_parser(
        "from-folder", help="one sub-folder of images per identity -> train.rec/.idx, property, classes.txt"
    )
    from_folder.add_argument("root", help="folder holding one sub-folder per identity (sorted names -> labels 0..N-1)")
    from_folder.add_argument("out_dir", help="output folder (created if missing)")
    from_folder.add_argument("--quality", type=int, default=95, help="JPEG quality (default: 95)")
    from_folder.add_argument("--image-size", type=int, default=112, help="square output size in pixels (default: 112)")
    from_folder.add_argument("--workers", type=int, default=None, help="encoding threads (default: one per CPU)")
    from_folder.add_argument("--quiet", action="store_true", help="no progress bar")
    from_folder.set_defaults(run=_from_folder)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConvertError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
