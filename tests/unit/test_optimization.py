"""The learning-rate schedules against formulas written out here, and what a resumed run keeps of them; the
optimizers' steps against torch optimizers built here by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sface_dist.config import HeadConfig, OptimConfig
from sface_dist.heads import build_head
from sface_dist.training.engine import DDPEngine
from sface_dist.training.optimization import (
    Optimization,
    Schedule,
    build_backbone_optimizer,
    build_grad_scaler,
    build_head_optimizer,
)
from sface_dist.training.trainer import Trainer

from synthetic_trainer import ENV, make_config, record_steps

CONSTANT = {"schedule": "step", "milestones": [1000.0]}
"""A schedule that keeps the peak learning rate over these tests' few steps."""


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
    checkpoint = tmp_path / "old" / "checkpoints" / "step-00000003"
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    torch.save({key: value for key, value in state.items() if key not in ("schedulers", "grad_scaler")},
               checkpoint / "trainer.pt")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["files"]  # that older format recorded no digests either
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert lrs(tmp_path / "old", 8) == pytest.approx(expected[3:], rel=1e-12)


def small_backbone() -> nn.Module:
    """A convolution without bias, batch norm, a linear layer with bias, layer norm."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 8), nn.LayerNorm(8)
    )


def build_optimization(cfg: OptimConfig, peak_lr: float = 0.1, total_steps: float = 100) -> Optimization:
    """The trainer's parts for one process: the backbone in a ``DDPEngine`` alone, an SFace head shard."""
    backbone = small_backbone()
    head = build_head(HeadConfig(), num_classes=6, embedding_size=8, process_group=None)
    backbone_optimizer = build_backbone_optimizer(backbone, cfg, peak_lr)
    grad_scaler = build_grad_scaler("none", torch.device("cpu"))
    engine = DDPEngine(backbone, backbone_optimizer, grad_scaler, backbone)
    head_optimizer = build_head_optimizer(head, cfg, peak_lr * cfg.head_lr_scale, "rows")
    schedule = Schedule(cfg, total_steps=total_steps, steps_per_epoch=10)
    return Optimization(engine, backbone_optimizer, head_optimizer, grad_scaler, cfg.grad_clip, schedule)


def trained_pairs(optimization: Optimization) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Every parameter the optimizers step (the backbone's in order, then the head shard) with a detached copy
    for a reference optimizer."""
    params = [*optimization.engine.model.parameters(), optimization.head_optimizer.head.weight]
    return [(p, p.detach().clone().requires_grad_(True)) for p in params]


def step_both(optimization: Optimization, reference: list[torch.optim.Optimizer], pairs: list, seed: int) -> None:
    """One step of ``optimization`` and of the ``reference`` optimizers on the same random gradients."""
    gen = torch.Generator().manual_seed(seed)
    for param, copy in pairs:
        param.grad = torch.randn(param.shape, generator=gen)
        copy.grad = param.grad.clone()
    optimization.unscale_and_clip()
    optimization.step(head_rows=None)
    optimization.zero_grad()
    for optimizer in reference:
        optimizer.step()


def test_adamw_steps_the_backbone_and_the_full_head_like_torch_adamw() -> None:
    """``optim.name: adamw`` with its betas, eps and weight decay, three steps; the head shard at sample rate 1
    (every row updated) is torch's AdamW on the shard."""
    cfg = OptimConfig(name="adamw", betas=[0.8, 0.95], eps=1e-3, weight_decay=0.05, grad_clip=0.0, **CONSTANT)
    optimization = build_optimization(cfg, peak_lr=0.01)
    pairs = trained_pairs(optimization)
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05)
    backbone = torch.optim.AdamW([copy for _, copy in pairs[:-1]], **hyper)
    reference = [backbone, torch.optim.AdamW([pairs[-1][1]], **hyper)]
    for seed in range(3):
        step_both(optimization, reference, pairs, seed)
    for param, copy in pairs:
        torch.testing.assert_close(param.detach(), copy.detach(), rtol=1e-6, atol=1e-7)


def test_no_decay_bn_bias_leaves_norm_layers_and_biases_undecayed() -> None:
    """One SGD step against a two-group torch SGD whose groups are listed here by hand."""
    cfg = OptimConfig(weight_decay=0.1, momentum=0.9, no_decay_bn_bias=True, grad_clip=0.0, **CONSTANT)
    optimization = build_optimization(cfg)
    pairs = trained_pairs(optimization)
    backbone = optimization.engine.model
    conv, batch_norm, linear, layer_norm = (backbone[i] for i in (0, 1, 3, 4))
    copies = {id(param): copy for param, copy in pairs}
    decayed = [copies[id(conv.weight)], copies[id(linear.weight)]]
    exempt = [copies[id(p)] for p in (batch_norm.weight, batch_norm.bias, linear.bias, layer_norm.weight,
                                      layer_norm.bias)]
    backbone = torch.optim.SGD(
        [{"params": decayed, "weight_decay": 0.1}, {"params": exempt, "weight_decay": 0.0}], lr=0.1, momentum=0.9
    )
    head = torch.optim.SGD([pairs[-1][1]], lr=0.1, momentum=0.9, weight_decay=0.1)
    step_both(optimization, [backbone, head], pairs, seed=0)
    for param, copy in pairs:
        torch.testing.assert_close(param.detach(), copy.detach(), rtol=1e-6, atol=1e-7)


def test_head_lr_scale_scales_the_head_learning_rate_through_the_schedule() -> None:
    """Warmup over 2 steps, then poly decay to step 6: the head's learning rate is the backbone's times 0.5."""
    cfg = OptimConfig(warmup_steps=2, poly_power=2.0, head_lr_scale=0.5)
    optimization = build_optimization(cfg, peak_lr=0.2, total_steps=6)
    backbone, head = [], []
    for _ in range(6):
        (backbone_group,), (head_group,) = (opt.param_groups for opt in optimization.optimizers)
        backbone.append(backbone_group["lr"])
        head.append(head_group["lr"])
        optimization.step()
    expected = [0.1, 0.2, 0.2, 0.2 * (3 / 4) ** 2, 0.2 * (2 / 4) ** 2, 0.2 * (1 / 4) ** 2]
    assert backbone == pytest.approx(expected, rel=1e-12)
    assert head == pytest.approx([0.5 * lr for lr in expected], rel=1e-12)
