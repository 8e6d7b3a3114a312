"""``train.on_nonfinite``: a NaN planted in the head's gradient (a hook), one process, batches of 4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sface_dist.training.step_metrics import DeviceMetrics
from sface_dist.training.trainer import Trainer

from synthetic_trainer import ENV, make_config


def plant_nan(trainer: Trainer, from_step: int) -> None:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan") if trainer.step + 1 >= from_step else grad

    trainer.head.weight.register_hook(hook)


def test_skip_leaves_the_weights_untouched_and_stops_after_max_in_a_row(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, batch_size=4, steps=4, log_every=4, on_nonfinite="skip", max_nonfinite=3)
    trainer = Trainer(cfg, ENV)
    try:
        plant_nan(trainer, from_step=2)
        before: list[torch.Tensor] = []
        train_step = trainer.train_step

        def recorded(batches: list) -> DeviceMetrics:
            before.append(trainer.head.weight.detach().clone())
            return train_step(batches)

        trainer.train_step = recorded  # type: ignore[method-assign]
        with pytest.raises(FloatingPointError, match=r"^step 2: the head gradient is not finite on rank 0 and on "
                           r"the 2 steps after it \(train.max_nonfinite=3\): stopped"):
            trainer.fit()
        assert trainer.step == 3 and trainer.watch.skipped == 3
        assert torch.equal(trainer.head.weight, before[1]) and not torch.equal(before[0], before[1])
    finally:
        trainer.close()


def test_stop_names_the_first_bad_step_at_the_next_log_step(tmp_path: Path) -> None:
    trainer = Trainer(make_config(tmp_path, batch_size=4, steps=4, log_every=4, checkpoint_every=2), ENV)
    try:
        plant_nan(trainer, from_step=3)
        with pytest.raises(FloatingPointError, match=r"^step 3: the head gradient is not finite on rank 0 \(the "
                           r"first such step\); step-00000002 stays the latest checkpoint"):
            trainer.fit()
        assert trainer.step == 4
        assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002"
    finally:
        trainer.close()
