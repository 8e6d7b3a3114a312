"""Embeddings of aligned face crops, from a folder of images or a ``.rec``, to ``.npy``.

    python tools/embed.py --checkpoint runs/ms1m --folder faces/ --out faces.npy
    python tools/embed.py --onnx sface_r100.onnx --rec data/ms1m/train.rec --out ms1m.npy

Writes ``OUT`` (float32 ``[N, D]``, row ``i`` for image ``i``) and ``OUT`` with the
suffix ``.txt``: one line per row, the image path relative to ``--folder``, or
``<record key>\\t<label>`` for ``--rec``. Embeddings are the sum over the image and its
mirror (``--no-flip``: the image alone), un-normalised unless ``--normalize``.
Crops that are not 112x112 are resized, with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from sface_dist.cli import run_cli
from sface_dist.evaluation.cli import add_model_arguments, open_model_from_args
from sface_dist.evaluation.extraction import extract_views
from sface_dist.evaluation.image_sources import FolderImages, RecordImages


def embed(args: argparse.Namespace) -> int:
    source = FolderImages(args.folder) if args.folder is not None else RecordImages(args.rec)
    model = open_model_from_args(args)
    print(f"{len(source)} images; model {model.description}", file=sys.stderr, flush=True)
    views = extract_views(
        model.embed,
        source.load,
        len(source),
        batch_size=args.batch_size,
        flip=args.flip,
        workers=args.workers,
        progress=None if args.quiet else sys.stderr,
    )
    embeddings = views.sum(axis=0)
    if args.normalize:
        embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    if source.resized:
        print(f"warning: resized {source.resized} of {len(source)} images to 112x112", file=sys.stderr)
    if isinstance(source, FolderImages):
        lines = source.names
    else:
        lines = [f"{key}\t{label}" for key, label in zip(source.keys.tolist(), source.labels.tolist())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, embeddings.astype(np.float32))
    listing = args.out.with_suffix(".txt")
    listing.write_text("".join(f"{line}\n" for line in lines))
    print(f"wrote {args.out} {list(embeddings.shape)} and {listing}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--folder", type=Path, help="folder of aligned crops (searched recursively)")
    images.add_argument("--rec", type=Path, help="dataset folder holding train.rec, or a .rec (its .idx beside it)")
    parser.add_argument("--out", type=Path, required=True, help="output .npy (the image list goes to .txt beside it)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="embed the images without mirrors")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.out.suffix != ".npy":
        parser.error("--out must end in .npy")
    return run_cli(lambda: embed(args))


if __name__ == "__main__":
    sys.exit(main())
