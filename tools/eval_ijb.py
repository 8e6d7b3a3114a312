"""IJB-B / IJB-C 1:1 verification of a checkpoint or an exported ONNX model.

    python tools/eval_ijb.py --checkpoint runs/ms1m --root IJB_release/IJBC --out results/ijbc

``--root`` holds ``meta/`` and ``loose_crop/`` (the target, IJBB or IJBC, is read from the
meta file names). Faces are aligned from their 5 landmarks, embedded with their mirror
and aggregated per media and template as insightface does. Writes into ``--out``:
``<target>_scores.npy`` (one score per line of the pair file), ``<target>_tar_at_far.json``,
``<target>_roc.png`` and ``cache/`` (embedding chunks: an interrupted run resumes there).

TAR@FAR is printed and saved two ways: the highest TAR at FAR <= target (the primary
reading), and the ROC point nearest the target, as insightface's published tables read it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sface_dist.cli import run_cli
from sface_dist.evaluation.alignment import import_cv2
from sface_dist.evaluation.cli import add_model_arguments, open_model_from_args
from sface_dist.evaluation.extraction import extract_views
from sface_dist.evaluation.ijb import format_tar_table, read_ijb, score_ijb, write_ijb_outputs
from sface_dist.evaluation.roc import import_pyplot


def evaluate(args: argparse.Namespace) -> int:
    import_cv2()  # both optional packages are needed: fail before the extraction, not after it
    import_pyplot()
    protocol = read_ijb(args.root, args.target)
    source = open_model_from_args(args)
    print(
        f"{protocol.target}: {len(protocol.image_names)} faces, {len(protocol.labels)} template pairs; "
        f"model {source.description}",
        flush=True,
    )
    cache_dir = args.out / "cache" / f"{protocol.target.lower()}-{source.cache_key}-{protocol.faces_key}"
    views = extract_views(
        source.embed,
        protocol.load_aligned,
        len(protocol.image_names),
        batch_size=args.batch_size,
        flip=True,
        cache_dir=cache_dir,
        workers=args.workers,
        progress=None if args.quiet else sys.stderr,
    )
    settings = {"flip": args.flip, "faceness_weighting": args.faceness, "normalize_images": args.normalize_images}
    result = score_ijb(protocol, views, **settings)
    paths = write_ijb_outputs(result, args.out, args.name, source.description, settings)
    print(
        f"{protocol.target} 1:1: {result.curve.num_genuine} genuine and {result.curve.num_impostor} impostor pairs; "
        + ", ".join(f"{key} {'on' if value else 'off'}" for key, value in settings.items())
    )
    print(format_tar_table(result, args.name))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--root", type=Path, required=True, help="IJB folder holding meta/ and loose_crop/")
    parser.add_argument("--target", choices=("IJBB", "IJBC"), help="default: read from the meta file names")
    parser.add_argument("--out", type=Path, required=True, help="output folder (scores, table, ROC, cache)")
    parser.add_argument("--name", default="model", help="model label in the table and plot (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=8, help="image decoding threads (default: %(default)s)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="image view only, no mirror sum")
    parser.add_argument("--no-faceness", dest="faceness", action="store_false", help="no faceness-score weighting")
    parser.add_argument("--normalize-images", action="store_true", help="unit image features before aggregation")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_cli(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
