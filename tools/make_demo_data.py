"""Make the demo dataset: synthetic identities as ``train.rec`` plus a held-out verification pack.

``python tools/make_demo_data.py --out data/demo`` renders ``--identities`` synthetic
identities into identity folders, converts them with ``folder_to_rec`` into
``OUT/train.rec``, ``train.idx``, ``property`` and ``classes.txt``, and writes
``OUT/heldout.bin``: ``--pairs`` verification pairs (half same identity, half different)
of ``--heldout`` further identities that training never sees. ``OUT/demo.json`` records
the arguments; a second run with the same arguments does nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from sface_dist.data.bin_pack import write_bin
from sface_dist.data.convert import folder_to_rec
from sface_dist.data.images import encode_jpeg
from sface_dist.data.synthetic import SyntheticFaces, write_identity_folders

_STAMP = "demo.json"
_OUTPUTS = ("train.rec", "train.idx", "property", "classes.txt", "heldout.bin")
_IMAGE_SIZE = 112


def make_demo_data(out: Path, identities: int, images: int, heldout: int, pairs: int, seed: int) -> bool:
    """Write the demo dataset into ``out``; False when it is already there for these arguments."""
    settings = {"identities": identities, "images": images, "heldout": heldout, "pairs": pairs, "seed": seed,
                "image_size": _IMAGE_SIZE}  # fmt: skip
    stamp = out / _STAMP
    if _read_stamp(stamp) == settings and all((out / name).is_file() for name in _OUTPUTS):
        return False
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    faces = SyntheticFaces(identities, _IMAGE_SIZE, seed)
    with tempfile.TemporaryDirectory(dir=out, prefix=".folders-") as folders:
        # BMP: lossless like PNG and ~30x faster to write; the folders only live until conversion.
        write_identity_folders(faces, folders, images, range(identities), suffix=".bmp")
        folder_to_rec(folders, out)
    pair_images, issame = faces.render_pairs(range(identities, identities + heldout), pairs, seed)
    write_bin(out / "heldout.bin", [encode_jpeg(image) for image in pair_images], issame)
    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    return True


def _read_stamp(stamp: Path) -> object:
    """The settings a finished run recorded, or None when there is no readable stamp."""
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/demo")
    parser.add_argument("--identities", type=int, default=800, help="training identities (default: 800)")
    parser.add_argument("--images", type=int, default=20, help="images per training identity (default: 20)")
    parser.add_argument("--heldout", type=int, default=100, help="held-out identities for verification (default: 100)")
    parser.add_argument("--pairs", type=int, default=600, help="verification pairs, an even number (default: 600)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic identity generator seed (default: 0)")
    args = parser.parse_args(argv)
    if min(args.identities, args.images, args.seed + 1) < 1 or args.heldout < 2 or args.pairs < 2 or args.pairs % 2:
        parser.error("need --identities >= 1, --images >= 1, --heldout >= 2, an even --pairs >= 2 and --seed >= 0")
    start = time.perf_counter()
    if not make_demo_data(args.out, args.identities, args.images, args.heldout, args.pairs, args.seed):
        print(f"{args.out} is up to date ({args.out / _STAMP} matches the arguments)")
        return 0
    print(
        f"wrote {args.out}: {args.identities} identities x {args.images} images in train.rec, "
        f"{args.pairs} pairs of {args.heldout} held-out identities in heldout.bin "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
