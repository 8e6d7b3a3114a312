"""Entry point: ``python -m sface_dist.train CONFIG [--set section.key=value ...]``.

Run under torchrun (or srun) for several ranks; without a launcher it trains as
one process. Errors in the user's input (config, data, packs) end with one line
naming the file and the problem; ``SFACE_DEBUG=1`` shows the full traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from sface_dist.config import load_config
from sface_dist.distributed import LaunchError, destroy_distributed, init_distributed
from sface_dist.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sface_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.steps=100",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        env = init_distributed()
        try:
            results = Trainer(cfg, env).fit()
        finally:
            destroy_distributed()
    except (ValueError, FileNotFoundError, FloatingPointError, LaunchError) as err:
        if os.environ.get("SFACE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    if env.is_main:
        for name, result in results.items():
            print(f"final verification {name}: accuracy {result.accuracy:.4f} ± {result.std:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
