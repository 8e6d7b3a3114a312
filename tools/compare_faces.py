"""Do two face photos show the same person? Their embeddings' cosine, and the verdict at ``--threshold``.

    python tools/compare_faces.py --checkpoint runs/ms1m a.jpg b.jpg --threshold 0.28
    python tools/compare_faces.py --onnx w600k_r50.onnx a.jpg b.jpg

The photos are aligned face crops, as the model was trained on (112x112; another size is resized, with a
warning). Each embedding is the sum over the photo and its mirror, as the evaluation tools compute it
(``--no-flip``: the photo alone). The threshold is a cosine: ``tools/eval_verification.py`` prints the one that
separates a verification pack best (``threshold ... (cosine C)``); without it, only the cosine is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sface_dist.cli import run_cli
from sface_dist.evaluation.cli import add_model_arguments, open_model_from_args
from sface_dist.evaluation.embedder import embed_images
from sface_dist.evaluation.image_sources import ImageFiles


def cosine_of(args: argparse.Namespace) -> float:
    """The cosine of the two photos' embeddings under the model ``args`` name."""
    photos = ImageFiles([args.first, args.second])
    model = open_model_from_args(args)
    print(f"model {model.description}", file=sys.stderr, flush=True)
    images = torch.stack([torch.from_numpy(photos.load(index)) for index in range(len(photos))])
    if photos.resized:
        print(f"warning: {photos.resized} photo(s) not 112x112 were resized: use aligned crops", file=sys.stderr)
    embeddings = embed_images(model.embed, images, batch_size=2, flip=args.flip)
    return F.cosine_similarity(embeddings[:1].double(), embeddings[1:].double()).item()


def compare(args: argparse.Namespace) -> int:
    cosine = cosine_of(args)
    if args.threshold is None:
        print(f"cosine {cosine:.4f}")
    else:
        verdict = "the same person" if cosine >= args.threshold else "different people"
        print(f"cosine {cosine:.4f}: {verdict} (threshold {args.threshold:g})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, batch_size=2)
    parser.add_argument("first", type=Path, help="a face photo (aligned crop)")
    parser.add_argument("second", type=Path, help="the other face photo")
    parser.add_argument("--threshold", type=float, help="cosine at or above which the two are the same person")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="embed each photo alone")
    args = parser.parse_args(argv)
    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: a cosine is in [-1, 1]")
    return run_cli(lambda: compare(args))


if __name__ == "__main__":
    sys.exit(main())
