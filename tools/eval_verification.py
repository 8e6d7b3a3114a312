"""Verification accuracy on insightface ``.bin`` packs, of a checkpoint or an exported ONNX model.

    python tools/eval_verification.py --checkpoint runs/ms1m --bin data/lfw.bin data/cfp_fp.bin
    python tools/eval_verification.py --onnx sface_r100.onnx --bin data/lfw.bin

Prints one row per pack: 10-fold accuracy ± std (threshold chosen on the other nine
folds), the mean best threshold (squared L2, and as a cosine), TAR at FAR 1e-3 and
1e-4 over all pairs, and XNorm. The flip test is on unless ``--no-flip``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sface_dist.cli import run_cli
from sface_dist.data.bin_pack import read_bin
from sface_dist.evaluation.cli import add_model_arguments, open_model_from_args
from sface_dist.evaluation.verification import VERIFICATION_FARS, VerificationResult, evaluate_embedder, require_folds
from sface_dist.progress_bar import ProgressBar


def format_row(name: str, result: VerificationResult) -> str:
    tars = " | ".join(f"{100 * result.tar_at_far[far]:.2f}" for far in VERIFICATION_FARS)
    return (
        f"| {name} | {result.num_pairs} | {100 * result.accuracy:.2f} ± {100 * result.std:.2f} | "
        f"{result.threshold:.2f} ({result.cosine_threshold:.3f}) | {tars} | {result.xnorm:.2f} |"
    )


def evaluate(args: argparse.Namespace) -> int:
    source = open_model_from_args(args)
    print(f"model: {source.description}; flip test {'on' if args.flip else 'off'}", flush=True)
    rows, report = [], {}
    for path in args.bin:
        pack = read_bin(path)
        require_folds(path, len(pack.issame))
        stream = None if args.quiet else sys.stderr
        with ProgressBar(len(pack.images), unit="images", stream=stream) as bar:
            result = evaluate_embedder(source.embed, pack, args.batch_size, args.flip, progress=bar)
        rows.append(format_row(pack.name, result))
        report[pack.name] = result.to_dict()
    far_columns = " | ".join(f"TAR@FAR={far:.0e} (%)" for far in VERIFICATION_FARS)
    print(f"| pack | pairs | accuracy (%) | threshold (cosine) | {far_columns} | XNorm |")
    print("|---|---|---|---|" + "---|" * len(VERIFICATION_FARS) + "---|")
    print("\n".join(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"model": source.description, "flip": args.flip, "packs": report}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--bin", nargs="+", required=True, help="verification packs (insightface .bin)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="embed the images without mirrors")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_cli(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
