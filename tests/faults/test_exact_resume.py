"""A run stopped and resumed under torchrun with 2 gloo ranks ends where the straight run does."""

from __future__ import annotations

from pathlib import Path

import torch

from training_runs import torchrun


def test_resume_continues_exactly(demo_data: Path, tmp_path: Path) -> None:
    """8 steps + resume to 12 equals 12 straight steps: data position, momentum, Partial-FC draws, RNG."""
    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"""
data: {{backend: torch, root: {demo_data}, batch_size: 8, num_workers: 0}}
model: {{backbone: tiny, embedding_size: 32}}
head: {{sample_rate: 0.5}}
optim: {{lr: 0.05, warmup_steps: 0, poly_power: 0.0}}
train: {{output: {tmp_path / name}, steps: 12, log_every: 4, checkpoint_every: 100}}
"""
        )
        return path

    torchrun(2, config("straight"))
    torchrun(2, config("resumed"), "train.steps=8")
    log = torchrun(2, config("resumed"))
    assert "at step 8" in log
    straight = tmp_path / "straight" / "checkpoints" / "step-00000012"
    resumed = tmp_path / "resumed" / "checkpoints" / "step-00000012"
    for name in ("head-00000000-00000012.pt", "head-00000012-00000024.pt"):
        a, b = torch.load(straight / name, weights_only=True), torch.load(resumed / name, weights_only=True)
        torch.testing.assert_close(b["head"]["rows"]["weight"], a["head"]["rows"]["weight"], rtol=0, atol=1e-6)
        momentum = (a["optimizer"]["rows"]["momentum_buffer"], b["optimizer"]["rows"]["momentum_buffer"])
        torch.testing.assert_close(momentum[1], momentum[0], rtol=0, atol=1e-6)
    a = torch.load(straight / "trainer.pt", weights_only=True)["backbone"]
    b = torch.load(resumed / "trainer.pt", weights_only=True)["backbone"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
