"""Build, inspect and rewrite RecordIO face datasets.

  from-folder ROOT OUT       identity sub-folders -> OUT/train.rec, train.idx, property, classes.txt
  from-list LIST ROOT OUT    im2rec .lst (index<TAB>label<TAB>path) -> OUT/train.rec, train.idx, property
  to-folder DATASET OUT      extract the images into OUT/<identity>/<key>.<ext>
  inspect DATASET [--verify] counts, layout, labels, image sizes; --verify decodes and re-frames everything
  repack DATASET OUT         flat, shuffled, images-only copy with scalar labels (DALI's reader layout)
  make-pairs ROOT OUT        a balanced, seeded pair list of identity folders (held-out identities)
  make-bin PAIRS ROOT OUT    verification pack (insightface .bin) from 'path_a path_b 1|0' lines
  reindex DATASET            rebuild a lost .idx by scanning the .rec

A DATASET is named by its folder (holding train.rec, train.idx), as from-folder writes it and
data.root takes it, or by its .rec file.
Every output is written under a temporary name and renamed into place at the end: a failed
or interrupted run leaves an existing output as it was. `python tools/convert_rec.py CMD --help`
describes each command.
"""

from __future__ import annotations

import argparse
import sys

from sface_dist.atomic_write import atomic_write_text
from sface_dist.cli import run_cli
from sface_dist.data.convert import (
    EncodeOptions,
    folder_to_rec,
    list_to_rec,
    make_bin,
    pair_list,
    rec_to_folder,
    repack,
)
from sface_dist.data.dataset_checks import dataset_rec_path
from sface_dist.data.inspection import inspect_rec
from sface_dist.data.recordio import ScannedRecord, rebuild_index
from sface_dist.progress_bar import ProgressBar


def _encode_options(args: argparse.Namespace) -> EncodeOptions:
    return EncodeOptions(image_size=args.image_size or None, quality=args.quality, pass_through=args.pass_through)


def _from_folder(args: argparse.Namespace) -> int:
    summary = folder_to_rec(
        args.root, args.out, _encode_options(args), args.shuffle, args.seed, not args.quiet, args.workers
    )
    print(summary.describe())
    return 0


def _from_list(args: argparse.Namespace) -> int:
    print(list_to_rec(args.list, args.root, args.out, _encode_options(args), not args.quiet, args.workers).describe())
    return 0


def _to_folder(args: argparse.Namespace) -> int:
    print(rec_to_folder(args.dataset, args.out, not args.quiet).describe("extracted to"))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_rec(args.dataset, args.verify, not args.quiet, args.workers)
    print(report.describe())
    return 1 if report.num_problems else 0


def _repack(args: argparse.Namespace) -> int:
    shuffle = not args.no_shuffle
    summary = repack(args.dataset, args.out, shuffle, args.seed, args.skip_bad, not args.quiet, args.exclude)
    print(summary.describe("repacked into"))
    return 0


def _make_pairs(args: argparse.Namespace) -> int:
    pairs = pair_list(args.root, args.pairs, args.seed)
    atomic_write_text(args.out, "".join(f"{first} {second} {int(same)}\n" for first, second, same in pairs))
    print(f"wrote {args.out}: {len(pairs)} pairs ({len(pairs) // 2} of one identity) of {args.root}")
    return 0


def _make_bin(args: argparse.Namespace) -> int:
    summary = make_bin(args.pairs, args.root, args.out, _encode_options(args), not args.quiet, args.workers)
    print(f"wrote {summary.out}: {summary.num_images // 2} pairs in {summary.seconds:.1f} s")
    return 0


def _reindex(args: argparse.Namespace) -> int:
    rec = dataset_rec_path(args.dataset)
    idx = rec.with_suffix(".idx")
    bar = ProgressBar(rec.stat().st_size // 2**20, unit="MiB", stream=None if args.quiet else sys.stderr)
    scanned_mib = 0

    def advance(scanned: ScannedRecord) -> None:
        nonlocal scanned_mib
        mib = (scanned.offset + len(scanned.record)) // 2**20
        if mib > scanned_mib:
            bar.update(mib - scanned_mib)
            scanned_mib = mib

    count = rebuild_index(rec, idx, keys=args.keys, on_record=advance)
    bar.close()
    print(f"wrote {idx}: {count} records")
    return 0


def _add_encoding(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, default=112, help="resize to this square size; 0 keeps sizes (112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (95)")
    parser.add_argument(
        "--pass-through", action="store_true", help="store JPEG/PNG files of the right size unchanged (no re-encode)"
    )
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: one per CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=summary)

    command = add("from-folder", "identity sub-folders -> insightface-layout .rec")
    command.add_argument("root", help="one sub-folder of images per identity (sorted names -> labels 0..N-1)")
    command.add_argument("out", help="output folder (created if missing)")
    _add_encoding(command)
    command.add_argument("--shuffle", action="store_true", help="random image order, flat layout (for DALI's reader)")
    command.add_argument("--seed", type=int, default=0, help="shuffle seed (0)")
    command.set_defaults(run=_from_folder)

    command = add("from-list", "im2rec .lst -> flat .rec (keys and ids from the list)")
    command.add_argument("list", help="lines 'index<TAB>label[<TAB>label...]<TAB>path'")
    command.add_argument("root", help="folder the list's paths are relative to")
    command.add_argument("out", help="output folder (created if missing)")
    _add_encoding(command)
    command.set_defaults(run=_from_list)

    command = add("to-folder", "extract images into OUT/<identity>/<key>.<ext>")
    command.add_argument("dataset", help="dataset folder or its train.rec (train.idx, optional classes.txt alongside)")
    command.add_argument("out", help="output folder: new, or empty")
    command.set_defaults(run=_to_folder)

    command = add("inspect", "counts, layout, labels, sizes; --verify checks every record")
    command.add_argument("dataset", help="dataset folder or its train.rec (train.idx, optional property alongside)")
    command.add_argument("--verify", action="store_true", help="decode every image and check every record's framing")
    command.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    command.set_defaults(run=_inspect)

    command = add("repack", "flat, shuffled, images-only copy with scalar labels")
    command.add_argument("dataset", help="source dataset folder or its train.rec (any layout)")
    command.add_argument("out", help="output folder (created if missing)")
    command.add_argument("--seed", type=int, default=0, help="shuffle seed (0)")
    command.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    command.add_argument("--skip-bad", action="store_true", help="leave out unreadable records and list them")
    command.add_argument(
        "--exclude", metavar="LIST", help="leave out the records whose keys LIST names (one per line, or a CSV)"
    )
    command.set_defaults(run=_repack)

    command = add("make-pairs", "a balanced pair list of identity folders, for make-bin")
    command.add_argument("root", help="one sub-folder of images per identity (held-out identities)")
    command.add_argument("out", help="pair list to write: lines 'path_a path_b 1|0', paths relative to ROOT")
    command.add_argument("--pairs", type=int, default=600, help="pairs, half of one identity (600)")
    command.add_argument("--seed", type=int, default=0, help="seed of the draw (0)")
    command.set_defaults(run=_make_pairs)

    command = add("make-bin", "verification pack from a pair list")
    command.add_argument("pairs", help="lines 'path_a path_b 1|0' (same identity or not)")
    command.add_argument("root", help="folder the pair paths are relative to")
    command.add_argument("out", help="output .bin")
    _add_encoding(command)
    command.set_defaults(run=_make_bin)

    command = add("reindex", "rebuild a dataset's .idx by scanning its .rec")
    command.add_argument("dataset", help="dataset folder or the .rec whose .idx is missing or wrong")
    command.add_argument(
        "--keys",
        choices=("sequential", "header-id"),
        default="sequential",
        help="keys 0,1,2.. in file order (insightface, this tool) or each record's header id (im2rec)",
    )
    command.set_defaults(run=_reindex)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
