"""Entry point: ``python -m sface_dist.train CONFIG [--set section.key=value ...]``.

Run under torchrun (or srun) for several ranks; without a launcher it trains as
one process. Errors in the user's input (config, data, packs, checkpoints, the
output folder, a full disk) end with one line naming the file or key and the
problem and exit status 1 (``cli``); ``SFACE_DEBUG=1`` shows the full traceback. Ctrl-C, SIGTERM or SIGUSR1 stop
every rank at the next step boundary with a checkpoint (exit status 128 + the signal's
number: 130, 143, 138); other signals meanwhile join that stop, the same one repeated after 2 s stops at once
(``stop_signals``). A peer that hangs past
``train.collective_timeout_minutes`` or dies is one line naming the collective.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from sface_dist.cli import FAILED, report_error, run_cli
from sface_dist.config import load_config
from sface_dist.console import say
from sface_dist.parallel.agreement import CollectiveError
from sface_dist.parallel.collectives import barrier
from sface_dist.parallel.launch import destroy_distributed, exit_now, init_distributed
from sface_dist.training.trainer import Trainer, naming_run_collective_failures


def leave_the_broken_group(error: CollectiveError) -> NoReturn:
    """A peer hung or died inside a collective: say so in one line (the traceback with ``SFACE_DEBUG``) and end the
    process at once, without tearing the process group down: its threads may still wait on the lost peer, and
    their teardown can hang or abort the process (``terminate called without an active exception``)."""
    report_error(error)
    exit_now(FAILED)


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


def train(args: argparse.Namespace) -> int:
    """Train the run ``args`` names; the exit status (``cli``: 128 + N when signal N stopped it)."""
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg.train.collective_timeout_minutes)
    try:
        with naming_run_collective_failures("a collective of the run's setup", cfg, env):
            trainer = Trainer(cfg, env)
        try:
            results = trainer.fit()
        finally:
            trainer.close()
        barrier()  # no rank tears its process group down while a peer still talks to it
    except CollectiveError as error:
        leave_the_broken_group(error)
    finally:
        destroy_distributed()
    if trainer.stop_signal:
        trainer.log("run the same command again to resume")
        return 128 + trainer.stop_signal
    for name, result in results.items():
        say(f"final verification {name}: accuracy {result.accuracy:.4f} ± {result.std:.4f}", env.rank)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: train(args))


if __name__ == "__main__":
    exit_now(main())
