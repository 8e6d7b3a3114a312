"""The optimizers, the learning-rate schedule and the loss scaler, stepped together.

``Optimization`` steps everything that changes the weights from their gradients: the loop
calls ``step`` once per optimizer step (unscale, clip the backbone, step both optimizers, update the loss
scaler, advance the schedule) and ``zero_grad`` once. The schedule is a pure function of the schedule step,
counted in steps of the run's first global batch (``state.TrainingProgress.schedule_batch``), applied through
``torch.optim.lr_scheduler.LambdaLR``; ``ScheduleClock`` maps this process's optimizer steps onto it, so a
run resumed at another world size keeps its schedule.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from sface_dist.config import Amp, OptimConfig, OptimizerName, SampleUpdate, check_choice
from sface_dist.heads import ShardedHead, ShardOptimizer
from sface_dist.training.engine import BackboneEngine

NORMALISATION = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Schedule:
    """The learning-rate factor (of the peak) at a schedule step: linear warmup, then ``optim.schedule``."""

    cfg: OptimConfig
    total_steps: float
    """The run's length in schedule steps."""
    steps_per_epoch: float
    """Schedule steps in an epoch, the unit of ``milestone_unit: epochs``."""

    def factor(self, step: float) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "step":
            unit = self.steps_per_epoch if cfg.milestone_unit == "epochs" else 1.0
            passed = sum(step >= milestone * unit for milestone in cfg.milestones)
            return cfg.decay_factor**passed
        decay_steps = max(1.0, self.total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** cfg.poly_power


@dataclass(frozen=True)
class ScheduleClock:
    """The schedule step of this process's optimizer step ``n``: ``start`` at ``first``, then ``ratio`` more per
    step (this process's global batch over the run's first, which differ after a resume at another world size)."""

    first: int = 0
    start: float = 0.0
    ratio: float = 1.0

    def __call__(self, n: int) -> float:
        return self.start + (n - self.first) * self.ratio


def backbone_param_groups(backbone: nn.Module, weight_decay: float, no_decay_bn_bias: bool) -> list[dict[str, Any]]:
    """One group decayed by ``weight_decay``; with ``no_decay_bn_bias``, a second undecayed group holding the
    normalisation layers' parameters and every bias."""
    if not no_decay_bn_bias:
        return [{"params": list(backbone.parameters()), "weight_decay": weight_decay}]
    exempt: set[int] = set()
    for module in backbone.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORMALISATION) or name == "bias":
                exempt.add(id(param))
    params = list(backbone.parameters())
    return [
        {"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0},
    ]


def build_backbone_optimizer(backbone: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    check_choice(cfg.name, OptimizerName, "optim.name")
    groups = backbone_param_groups(backbone, cfg.weight_decay, cfg.no_decay_bn_bias)
    if cfg.name == "adamw":
        beta1, beta2 = cfg.betas
        return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=cfg.eps)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def build_head_optimizer(
    head: ShardedHead, cfg: OptimConfig, lr: float, sample_update: SampleUpdate
) -> torch.optim.Optimizer:
    """The head shard's optimizer, ``optim.name`` like the backbone's (its state is checkpointed by class rows,
    with the shard)."""
    beta1, beta2 = cfg.betas
    return ShardOptimizer(
        head, lr=lr, name=cfg.name, momentum=cfg.momentum, betas=(beta1, beta2), eps=cfg.eps,
        weight_decay=cfg.weight_decay, sample_update=sample_update,
    )


def autocast(amp: Amp, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The forward's autocast region for ``train.amp`` on ``device`` (none for fp32)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def build_grad_scaler(amp: Amp, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (``train.amp``); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


class Optimization:
    """Both optimizers, their ``LambdaLR`` schedules and the fp16 loss scaler, for the loop to step as one.

    The Trainer builds the parts (``build_backbone_optimizer``, ``build_head_optimizer``, ``build_grad_scaler``,
    ``engine.build_engine``) and hands them over. The backbone is stepped through its ``engine``, which owns its
    gradient sum, clipping and the layout of its optimizer state; its torch ``backbone_optimizer`` is the one whose
    learning rates the schedule sets (DeepSpeed steps its partitions with those groups). ``state_dict`` holds what
    only this object owns: the schedulers and the loss scaler.
    """

    def __init__(
        self,
        engine: BackboneEngine,
        backbone_optimizer: torch.optim.Optimizer,
        head_optimizer: ShardOptimizer,
        grad_scaler: torch.amp.GradScaler,
        grad_clip: float,
        schedule: Schedule,
    ) -> None:
        self.engine, self.grad_scaler, self.grad_clip = engine, grad_scaler, grad_clip
        self.backbone_optimizer, self.head_optimizer = backbone_optimizer, head_optimizer
        self.optimizers = (backbone_optimizer, head_optimizer)
        self.peak_lrs = [[group["lr"] for group in opt.param_groups] for opt in self.optimizers]
        self.schedule, self.clock = schedule, ScheduleClock()
        self.schedulers = self._schedulers(0)

    def _schedulers(self, n: int) -> list[LambdaLR]:
        """Schedulers whose next optimizer step is ``n``, from the peak learning rates of the config."""
        for optimizer, peaks in zip(self.optimizers, self.peak_lrs, strict=True):
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["initial_lr"] = peak

        def factor(step: int) -> float:
            return self.schedule.factor(self.clock(step))

        return [LambdaLR(optimizer, factor, last_epoch=n - 1) for optimizer in self.optimizers]

    def restart(self, schedule: Schedule, start: float, ratio: float) -> None:
        """Continue ``schedule`` from schedule step ``start``, advancing ``ratio`` schedule steps per optimizer step."""
        n = self.schedulers[0].last_epoch
        self.schedule, self.clock = schedule, ScheduleClock(n, start, ratio)
        self.schedulers = self._schedulers(n)

    @property
    def lr(self) -> float:
        """The backbone's learning rate for the next optimizer step."""
        return self.backbone_optimizer.param_groups[0]["lr"]

    def unscale_and_clip(self) -> Tensor:
        """Unscale the backbone gradient, clip it to ``optim.grad_clip`` (0: no clipping) and return its norm
        before clipping, on the device."""
        return self.engine.clip_grad_norm(self.grad_clip)

    def step(self, apply: bool = True, head_rows: Tensor | None = None, backbone: bool = True) -> None:
        """Step both optimizers (unless ``apply`` is false: the weights stay as they are), the head's on
        ``head_rows`` (the Partial-FC rows scored this step; None: every row), the backbone's unless ``backbone``
        is false (a frozen backbone: no decay, no momentum), update the loss scaler and advance the schedule.
        Call ``unscale_and_clip`` first."""
        if apply:
            if backbone:
                self.engine.step()
            self.grad_scaler.step(self.head_optimizer, head_rows)
            self.grad_scaler.update()
        else:
            self.engine.discard_gradients()
        with warnings.catch_warnings():  # the schedule follows the data: a step left out still counts
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for scheduler in self.schedulers:
                scheduler.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """The schedulers and the loss scaler (the engine checkpoints the backbone optimizer, the head shard its
        own, by class rows)."""
        return {
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "grad_scaler": self.grad_scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; checkpoints older than the schedulers and the scaler hold neither.

        Learning rates come from the config and the schedule (``restart``), not from the checkpoint.
        """
        try:
            for scheduler, saved in zip(self.schedulers, state.get("schedulers") or [], strict=False):
                scheduler.load_state_dict(saved)
            if state.get("grad_scaler"):
                self.grad_scaler.load_state_dict(state["grad_scaler"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"the learning-rate schedule or loss scaler state does not fit: {error}") from None
        self.schedulers = self._schedulers(self.schedulers[0].last_epoch)
