"""The learning-rate schedules against formulas written out here, and what a resumed run keeps of them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_trainer import ENV, make_config, record_steps

from sface_dist.config import OptimConfig
from sface_dist.optimization import Schedule
from sface_dist.trainer import Trainer


def test_cosine_decays_to_zero_after_warmup() -> None:
    schedule = Schedule(OptimConfig(schedule="cosine", warmup_steps=2), total_steps=10, steps_per_epoch=1)
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi * 2 / 8)), 6: 0.5, 10: 0.0, 12: 0.0}
    assert {step: schedule.factor(step) for step in expected} == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("unit", "steps_per_epoch", "milestones"),
    [("steps", 1, [5, 8]), ("epochs", 4, [1.25, 2])],  # epochs of 4 steps: milestones at steps 5 and 8 again
)
def test_step_decay_multiplies_by_the_factor_at_each_milestone(
    unit: str, steps_per_epoch: int, milestones: list[float]
) -> None:
    cfg = OptimConfig(schedule="step", warmup_steps=2, milestones=milestones, milestone_unit=unit, decay_factor=0.1)
    schedule = Schedule(cfg, total_steps=100, steps_per_epoch=steps_per_epoch)
    expected = {0: 0.5, 1: 1.0, 4: 1.0, 4.5: 1.0, 5: 0.1, 7.5: 0.1, 8: 0.01, 99: 0.01}
    assert {step: schedule.factor(step) for step in expected} == pytest.approx(expected, rel=1e-12)


def test_a_resumed_run_continues_the_schedule_with_or_without_saved_scheduler_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight steps in one go, against three then five more after a resume, and again from a checkpoint whose
    trainer.pt predates the scheduler state: step decay at epochs 0.5 and 1 (6 batches of 8), 2 warmup steps."""
    optim = OptimConfig(lr=0.1, warmup_steps=2, schedule="step", milestones=[0.5, 1.0], milestone_unit="epochs")

    def lrs(output: Path, steps: int) -> list[float]:
        trainer = Trainer(make_config(output, optim=optim, steps=steps), ENV)
        try:
            recorded = record_steps(trainer, monkeypatch)
            trainer.fit()
            return [lr for lr, _ in recorded]
        finally:
            trainer.close()

    expected = [0.05, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001]
    assert lrs(tmp_path / "straight", 8) == pytest.approx(expected, rel=1e-12)
    assert lrs(tmp_path / "resumed", 3) + lrs(tmp_path / "resumed", 8) == pytest.approx(expected, rel=1e-12)
    lrs(tmp_path / "old", 3)
    trainer_file = tmp_path / "old" / "checkpoints" / "step-00000003" / "trainer.pt"
    state = torch.load(trainer_file, weights_only=True)
    torch.save({key: value for key, value in state.items() if key not in ("schedulers", "grad_scaler")}, trainer_file)
    assert lrs(tmp_path / "old", 8) == pytest.approx(expected[3:], rel=1e-12)
