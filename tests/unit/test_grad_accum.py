"""Gradient accumulation on real gloo ranks: ``train.grad_accum`` micro-batches per optimizer step give the
step of one large batch (their union), against an fp64 SGD step written out here.

A backbone without batch norm (whose statistics would see micro-batches, not the union), the SFace head and
ArcFace; 1 and 2 ranks, 2 micro-steps. Then Partial FC with accumulation in one process: a run repeated, or
resumed, is the same run bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

import sface_dist.training.trainer as trainer_module
from sface_dist.config import Config, DataConfig, HeadConfig, ModelConfig, OptimConfig, TrainConfig
from sface_dist.heads.margin import MARGIN_TYPES
from sface_dist.parallel.launch import DistEnv
from sface_dist.training.trainer import Trainer

from rank_launcher import run_ranks
from sface_reference import margin_reference, relative_error, sface_reference

CLASSES, EMBEDDING, PER_RANK = 6, 8, 3
LR, WEIGHT_DECAY, MOMENTUM = 0.05, 5e-4, 0.9
HEADS = {"sface": HeadConfig(s=30.0, k=4.0, a=1.2, b=1.4), "arcface": HeadConfig(type="arcface", s=16.0)}


def make_backbone(*_: Any, **__: Any) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, EMBEDDING))


def global_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(size, 3, 4, 4, generator=gen), torch.randint(0, CLASSES, (size,), generator=gen)


def make_config(output: Path, head: HeadConfig, grad_accum: int) -> Config:
    return Config(
        data=DataConfig(backend="synthetic", num_classes=CLASSES, synthetic_images_per_class=4, batch_size=PER_RANK,
                        num_workers=0),
        model=ModelConfig(backbone="tiny", embedding_size=EMBEDDING),
        head=head,
        optim=OptimConfig(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, grad_clip=0.0),
        train=TrainConfig(output=str(output), steps=4, grad_accum=grad_accum),
    )


def accumulate_worker(rank: int, world: int, output: str, grad_accum: int) -> dict[str, Any]:
    """One optimizer step of each head on this rank's share of every micro-batch of the global batch."""
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    images, labels = global_batch(PER_RANK * world * grad_accum)
    results = {}
    for name, head in HEADS.items():
        with mock.patch.object(trainer_module, "build_backbone", make_backbone):
            trainer = Trainer(make_config(Path(output) / name, head, grad_accum), env)
        try:
            before = trainer.head.weight.detach().clone()
            batches = []
            for micro in range(grad_accum):
                start = (micro * world + rank) * PER_RANK
                batches.append((images[start : start + PER_RANK], labels[start : start + PER_RANK]))
            metrics = trainer.train_step(batches)
            results[name] = {
                "range": trainer.head.class_range,
                "head_before": before,
                "head_after": trainer.head.weight.detach().clone(),
                "backbone_after": [p.detach().clone() for p in trainer.backbone.parameters()],
                "loss": metrics.read().loss,
            }
        finally:
            trainer.close()
    return results


def reference_step(name: str, head_weight: torch.Tensor, size: int) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """fp64 SGD from the same weights on the whole global batch: (backbone after, head after, loss). A first
    step's momentum buffer is the gradient itself."""
    images, labels = global_batch(size)
    backbone = make_backbone().double()
    weight = head_weight.double().requires_grad_(True)
    embeddings = backbone(images.double())
    cfg = HEADS[name]
    if cfg.type == "sface":
        loss = sface_reference(embeddings, weight, labels, cfg.s, cfg.k, cfg.a, cfg.b)["loss"]
    else:
        m1, m2, m3 = MARGIN_TYPES[cfg.type]
        loss = margin_reference(embeddings, weight, labels, cfg.s, m1, m2, m3, cfg.margin_grad)["loss"]
    loss.backward()
    params = [p.detach() - LR * (p.grad + WEIGHT_DECAY * p.detach()) for p in [*backbone.parameters(), weight]]
    return params[:-1], params[-1], loss.item()


@pytest.mark.parametrize("world", [1, 2])
def test_accumulated_micro_batches_step_like_their_union(tmp_path: Path, world: int) -> None:
    """Two micro-steps; one rank runs in this process, two are spawned."""
    grad_accum = 2
    if world == 1:
        per_rank = [accumulate_worker(0, 1, str(tmp_path), grad_accum)]
    else:
        per_rank = run_ranks(accumulate_worker, world, str(tmp_path), grad_accum)
    for name in HEADS:
        results = [r[name] for r in per_rank]
        head_before = torch.cat([r["head_before"] for r in results])
        backbone, head, loss = reference_step(name, head_before, PER_RANK * world * grad_accum)
        assert results[0]["loss"] == pytest.approx(loss, rel=1e-5), name
        assert relative_error(torch.cat([r["head_after"] for r in results]) - head_before, head - head_before) < 1e-5
        initial = [p.detach().double() for p in make_backbone().parameters()]
        for r in results:
            for got, expected, start in zip(r["backbone_after"], backbone, initial, strict=True):
                assert relative_error(got.double() - start, expected - start) < 1e-5, name


def partial_fc_weights(output: Path, steps: int) -> dict[str, torch.Tensor]:
    """Run the tiny backbone with an SFace head at sample rate 0.5 of 8 classes, 2 micro-batches of 2 a step, to
    ``steps`` (resuming from ``output`` if it holds a checkpoint); the backbone, head and head optimizer state."""
    cfg = Config(
        data=DataConfig(backend="synthetic", num_classes=8, synthetic_images_per_class=2, batch_size=2, num_workers=0),
        model=ModelConfig(backbone="tiny", embedding_size=EMBEDDING),
        head=HeadConfig(sample_rate=0.5),
        optim=OptimConfig(lr=LR, schedule="step", milestones=[1000.0]),
        train=TrainConfig(output=str(output), steps=steps, grad_accum=2, log_every=steps),
    )
    trainer = Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    try:
        trainer.fit()
        rows = trainer.optimization.head_optimizer.state_dict()["rows"]
        return {
            **{f"backbone {name}": t.clone() for name, t in trainer.backbone.state_dict().items()},
            "head": trainer.head.weight.detach().clone(),
            **{f"head {name}": t.clone() for name, t in rows.items()},
        }
    finally:
        trainer.close()


def test_partial_fc_with_accumulation_repeats_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Four steps twice, and two steps then two more after a resume (the learning rate is constant, so the
    shorter first leg keeps the schedule)."""
    straight = partial_fc_weights(tmp_path / "straight", 4)
    again = partial_fc_weights(tmp_path / "again", 4)
    partial_fc_weights(tmp_path / "resumed", 2)
    resumed = partial_fc_weights(tmp_path / "resumed", 4)
    assert set(straight) == set(again) == set(resumed)
    for name, weights in straight.items():
        assert torch.equal(weights, again[name]), name
        assert torch.equal(weights, resumed[name]), name
