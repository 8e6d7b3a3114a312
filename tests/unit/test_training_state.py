"""The loop's own components: ``TrainingProgress`` and ``RNGState`` round-trip ``trainer.pt``'s keys and refuse
what does not fit in one line."""

from __future__ import annotations

import pytest
import torch

from sface_dist.training.state import RNGState, TrainingProgress


def test_progress_round_trips_the_checkpoint_keys_and_advances_in_samples() -> None:
    progress = TrainingProgress(step=0, samples=0, epoch=0, epoch_samples=0, schedule_batch=8)
    progress.advance(12)
    progress.advance(12)
    assert progress.state_dict() == {"step": 2, "progress": {"samples": 24, "epoch": 0, "epoch_samples": 24,
                                                             "schedule_batch": 8}}
    progress.end_epoch()
    restored = TrainingProgress(step=0, samples=0, epoch=0, epoch_samples=0, schedule_batch=16)
    restored.load_state_dict(progress.state_dict())
    assert restored == TrainingProgress(step=2, samples=24, epoch=1, epoch_samples=0, schedule_batch=8)
    with pytest.raises(ValueError, match=r"^the progress record is not \{samples, epoch, epoch_samples, "):
        restored.load_state_dict({"step": 2, "progress": {"samples": "24", "epoch": 0}})


def test_rng_state_restores_the_draws_and_refuses_another_object() -> None:
    rng = RNGState()
    saved = rng.state_dict()
    first = torch.rand(3)
    rng.load_state_dict(saved)
    assert torch.equal(torch.rand(3), first)
    with pytest.raises(ValueError, match="^the RNG state does not load"):
        rng.load_state_dict({"rng": {"torch": torch.zeros(3)}})
