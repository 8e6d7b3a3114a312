"""Suspected mislabelled images of a training set, ranked, from a trained checkpoint.

    python tools/find_noisy_labels.py --checkpoint runs/ms1m --out noise/ms1m
    torchrun --nproc_per_node=8 tools/find_noisy_labels.py --checkpoint runs/ms1m --out noise/ms1m
    python tools/convert_rec.py repack data/ms1m/train.rec data/ms1m_clean --exclude noise/ms1m/exclude.txt

Embeds every image of the dataset (the flip test), scores it against the head's class
centres and its identity's other images, and writes ``OUT/suspects.csv`` (record key,
label, cosine to its own centre, the nearest other class and its cosine, cosine to its
identity's other images; most suspicious first), ``OUT/exclude.txt`` (their keys) and
``OUT/scores.npz`` (every image's scores). Under torchrun each rank embeds a share of the
images on its own GPU (or CPU).
An image is a suspect when another class centre is nearer than its own, or its cosine to
its identity's other images is below ``--threshold``. The dataset defaults to the one the run trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sface_dist.cli import run_cli
from sface_dist.evaluation.noisy_labels import DEFAULT_THRESHOLD, find_noisy_labels
from sface_dist.parallel.launch import destroy_distributed, exit_now, init_distributed


def find(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: a file: name the folder for suspects.csv, exclude.txt and scores.npz")
    env = init_distributed()
    try:
        report = find_noisy_labels(args.checkpoint, args.out, env, args.rec, threshold=args.threshold,
                                   batch_size=args.batch_size, flip=args.flip, workers=args.workers,
                                   progress=None if args.quiet or not env.is_main else sys.stderr)
    finally:
        destroy_distributed()
    if report is not None:
        share = report.suspects / report.images
        print(f"{report.suspects} suspects of {report.images} images of {report.rec} ({share:.1%}): "
              f"{report.table}, {report.listing}")
        print(f"median cosine to the own class centre: {report.median_own:.3f}")
    return 0


def cosine(text: str) -> float:
    """A cosine threshold: a number in [-1, 1] (above 1 every image would be a suspect)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a cosine in [-1, 1]")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint: step dir, run dir or checkpoints dir")
    parser.add_argument("--rec", help="dataset folder or its .rec (default: the run's data.root)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for suspects.csv and exclude.txt")
    parser.add_argument("--threshold", type=cosine, default=DEFAULT_THRESHOLD,
                        help="cosine to its identity's other images below which an image is a suspect "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads (default: %(default)s)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="embed the images without mirrors")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_cli(lambda: find(args))


if __name__ == "__main__":
    exit_now(main())
