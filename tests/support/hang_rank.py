"""``python -m sface_dist.train`` with one rank that stops answering for a while: a hung peer, for
``tests/faults/test_preemption_launches.py``.

``python tests/support/hang_rank.py RANK SECONDS WHERE CONFIG [--set ...]``: rank ``RANK`` sleeps ``SECONDS`` once, at
``WHERE``: ``after-step-3`` (its peers wait in the next step's agreement) or ``checkpoint-4`` (before it writes its
head shard of step 4's checkpoint; its peers wait before that checkpoint is published).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from sface_dist import checkpoint, train
from sface_dist.training.trainer import Trainer


def main() -> int:
    rank, seconds, where, *argv = sys.argv[1:]
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID")) != rank:
        return train.main(argv)
    if where == "after-step-3":
        train_step = Trainer.train_step

        def sleeping_step(self: Trainer, batches: Any) -> Any:
            metrics = train_step(self, batches)
            if self.step + 1 == 3:
                time.sleep(float(seconds))
            return metrics

        Trainer.train_step = sleeping_step  # type: ignore[method-assign]
    elif where == "checkpoint-4":
        save = checkpoint._save

        def sleeping_save(state: Any, path: Path) -> None:
            if path.name.startswith("head-") and path.parent.name.startswith("step-00000004"):
                time.sleep(float(seconds))
            save(state, path)

        checkpoint._save = sleeping_save
    else:
        raise SystemExit(f"unknown WHERE {where!r}")
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
