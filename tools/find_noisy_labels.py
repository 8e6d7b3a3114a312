"""Suspected mislabelled images of a training set, ranked, from a trained checkpoint.

    python tools/find_noisy_labels.py --checkpoint runs/ms1m --out noise/ms1m
    python tools/convert_rec.py repack data/ms1m/train.rec data/ms1m_clean --exclude noise/ms1m/exclude.txt

Embeds every image of the dataset (the flip test), scores it against the head's class
centres and its identity's other images, and writes ``OUT/suspects.csv`` (record key,
label, cosine to its own centre, the nearest other class and its cosine, cosine to its
identity's other images; most suspicious first) and ``OUT/exclude.txt`` (their keys).
An image is a suspect when another class centre is nearer than its own, or its own
centre's cosine is below ``--threshold``. The dataset defaults to the one the run trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from sface_dist.checkpoint import CheckpointError, load_head_shard, read_manifest
from sface_dist.data.convert import known_num_classes
from sface_dist.evaluation.checkpoint_backbone import resolve_checkpoint
from sface_dist.evaluation.cli import default_device, open_model_from_args, run_tool
from sface_dist.evaluation.extraction import extract_views
from sface_dist.evaluation.image_sources import RecordImages
from sface_dist.evaluation.noisy_labels import DEFAULT_THRESHOLD, score_labels, write_suspects


def find(args: argparse.Namespace) -> int:
    checkpoint = resolve_checkpoint(args.checkpoint)
    manifest = read_manifest(checkpoint)
    if "head_files" not in manifest:
        raise CheckpointError(f"{checkpoint}: holds no head (a best-backbone folder?): name a training checkpoint")
    num_classes = int(manifest["num_classes"])
    rec = Path(args.rec) if args.rec else Path(manifest["config"]["data"]["root"]) / "train.rec"
    source = RecordImages(rec)
    dataset_classes = known_num_classes(rec, source.index)
    if dataset_classes is not None and dataset_classes != num_classes:
        raise CheckpointError(f"{checkpoint}: its head has {num_classes} classes, {rec} has {dataset_classes}")
    centres, _ = load_head_shard(checkpoint, (0, num_classes), num_classes)
    model = open_model_from_args(args)
    print(f"{len(source)} images of {rec}; model {model.description}", file=sys.stderr, flush=True)
    views = extract_views(model.embed, source.load, len(source), batch_size=args.batch_size, flip=args.flip,
                          workers=args.workers, progress=None if args.quiet else sys.stderr)
    labels = torch.from_numpy(source.labels)
    if int(labels.max()) >= num_classes:
        raise CheckpointError(f"{rec}: label {int(labels.max())} is outside the checkpoint's {num_classes} classes")
    scores = score_labels(torch.from_numpy(views.sum(axis=0)), labels, centres)
    table, listing, count = write_suspects(args.out, source.keys, source.labels, scores, args.threshold)
    share = count / len(source)
    print(f"{count} suspects of {len(source)} images ({share:.1%}): {table}, {listing}")
    print(f"median cosine to the own class centre: {np.median(scores.own):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint: step dir, run dir or checkpoints dir")
    parser.add_argument("--rec", help="dataset .rec (default: the run's data.root/train.rec)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for suspects.csv and exclude.txt")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="own-centre cosine below which an image is a suspect (default: %(default)s)")
    parser.add_argument("--device", default=default_device(), help="PyTorch device (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads (default: %(default)s)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="embed the images without mirrors")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.onnx = None
    return run_tool(find, args)


if __name__ == "__main__":
    sys.exit(main())
