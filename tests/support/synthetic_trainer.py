"""A trainer in this process at world size 1 (no process group, as ``python -m sface_dist.train`` without a
launcher) on synthetic faces and the tiny backbone: its environment, its config, and a record of its steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from sface_dist.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from sface_dist.parallel.launch import DistEnv
from sface_dist.training.step_metrics import DeviceMetrics, StepMetrics
from sface_dist.training.trainer import Trainer

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
IMAGES_PER_CLASS = 8
CLASSES = 6


def make_config(output: Path, batch_size: int = 8, optim: OptimConfig | None = None, **train: Any) -> Config:
    """Synthetic faces (6 identities x 8 images), the tiny backbone at D=16, the default SFace head."""
    data = DataConfig(
        backend="synthetic",
        num_classes=CLASSES,
        synthetic_images_per_class=IMAGES_PER_CLASS,
        batch_size=batch_size,
        num_workers=0,
    )
    return Config(
        data=data,
        model=ModelConfig(backbone="tiny", embedding_size=16),
        optim=optim or OptimConfig(),
        train=TrainConfig(output=str(output), **{"steps": 4, "log_every": 1, **train}),
    )


def record_steps(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, StepMetrics]]:
    """(learning rate, metrics) of every ``train_step`` the trainer runs from now on."""
    steps: list[tuple[float, StepMetrics]] = []
    train_step = trainer.train_step

    def recorded(batches: list[tuple[Tensor, Tensor]]) -> DeviceMetrics:
        lr = trainer.optimization.lr
        metrics = train_step(batches)
        steps.append((lr, metrics.read()))
        return metrics

    monkeypatch.setattr(trainer, "train_step", recorded)
    return steps
