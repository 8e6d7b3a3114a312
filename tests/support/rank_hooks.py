"""Run the trainer as torchrun's worker with one test hook:
``python tests/support/rank_hooks.py HOOK CONFIG [--set ...]``.

Hooks (the trainer itself has none, so no setting can trigger them in production):

* ``every-rank-logs``: every rank prints the trainer's log lines, not only rank 0, so that each
  rank's own loss can be read from its torchrun log file;
* ``kill-before-publish=STEP``: rank 0 of torchrun's first attempt SIGKILLs itself while writing the
  checkpoint of ``STEP``, after every file of ``step-N.tmp`` is written and before it is renamed;
* ``slow-stop=SECONDS``: every rank waits that long before writing the checkpoint of a stop signal, as a large
  model's write would take, so that signals sent meanwhile find the workers still stopping.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from sface_dist import checkpoint, train
from sface_dist.training.trainer import Trainer


def every_rank_logs() -> None:
    Trainer.log = lambda self, message: print(message, flush=True)  # type: ignore[method-assign]


def kill_before_publish(step: int) -> None:
    publish = checkpoint._publish

    def killing_publish(tmp: Path, final: Path) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and final.name == f"{checkpoint.STEP_PREFIX}{step:08d}":
            os.kill(os.getpid(), signal.SIGKILL)
        publish(tmp, final)

    checkpoint._publish = killing_publish


def slow_stop(seconds: float) -> None:
    save = Trainer.save

    def slow_save(self: Trainer) -> Path:
        if self.stop_signal:
            time.sleep(seconds)
        return save(self)

    Trainer.save = slow_save  # type: ignore[method-assign]


def main() -> int:
    hook, argv = sys.argv[1], sys.argv[2:]
    name, _, value = hook.partition("=")
    if name == "every-rank-logs":
        every_rank_logs()
    elif name == "kill-before-publish":
        kill_before_publish(int(value))
    elif name == "slow-stop":
        slow_stop(float(value))
    else:
        raise SystemExit(f"unknown hook {hook}")
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
