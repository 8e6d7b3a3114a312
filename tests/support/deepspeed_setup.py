"""The DeepSpeed tests' runs: the tiny backbone and an SFace head on synthetic faces under each engine (DDP,
ZeRO-1, ZeRO-2), and each rank's environment on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sface_dist.config import Config, DataConfig, DeepSpeedConfig, ModelConfig, OptimConfig, TrainConfig
from sface_dist.parallel.launch import DistEnv

PER_RANK, CLASSES = 4, 8
ENGINES = {
    "ddp": ("ddp", 1),
    "zero1": ("deepspeed", 1),
    "zero2": ("deepspeed", 2),
}


def make_config(output: Path, engine: str, steps: int = 1, grad_accum: int = 1, grad_clip: float = 1.0,
                optimizer: str = "sgd", amp: str = "none") -> Config:
    """The tiny backbone and an SFace head on synthetic faces; SGD with momentum (or AdamW) and weight decay, and
    by default a clip that binds (the untrained net's gradient norm is far above 1). AdamW's eps is 1e-4: the
    tiny net's last bias feeds a batch norm, so its gradient is rounding noise, which a small eps turns into
    steps of ±lr that differ between any two summation orders."""
    kind, stage = ENGINES[engine]
    return Config(
        data=DataConfig(backend="synthetic", num_classes=CLASSES, synthetic_images_per_class=8, batch_size=PER_RANK,
                        num_workers=0),
        model=ModelConfig(backbone="tiny", embedding_size=16),
        optim=OptimConfig(name=optimizer, lr=0.05, eps=1e-4, grad_clip=grad_clip, schedule="cosine", warmup_steps=1),
        train=TrainConfig(output=str(output), steps=steps, grad_accum=grad_accum, engine=kind, amp=amp, log_every=100,
                          checkpoint_every=100),
        deepspeed=DeepSpeedConfig(stage=stage),
    )


def cpu_env(rank: int, world: int) -> DistEnv:
    """Rank ``rank`` of ``world`` on the CPU."""
    return DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
