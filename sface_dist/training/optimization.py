"""The optimizers, the learning-rate schedule and the loss scaler, stepped together.

``Optimization`` is the one owner of everything that changes the weights from their gradients: the loop
calls ``step`` once per optimizer step (unscale, clip the backbone, step both optimizers, update the loss
scaler, advance the schedule) and ``zero_grad`` once. The schedule is a pure function of the schedule step,
counted in steps of the run's first global batch (``checkpoint.Progress.schedule_batch``), applied through
``torch.optim.lr_scheduler.LambdaLR``; ``ScheduleClock`` maps this process's optimizer steps onto it, so a
run resumed at another world size keeps its schedule.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from sface_dist.config import Amp, OptimConfig, OptimizerName, SampleUpdate, check_choice
from sface_dist.heads import ShardedHead, ShardOptimizer
from sface_dist.training.engine import BackboneEngine, DDPEngine

EngineFactory = Callable[[torch.optim.Optimizer, torch.amp.GradScaler], BackboneEngine]
"""Builds the backbone's engine around its torch optimizer and the loss scaler (``engine.build_engine``)."""

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


class Optimization:
    """Both optimizers, their ``LambdaLR`` schedules and the fp16 loss scaler, for the loop to step as one.

    ``peak_lr`` is the backbone's peak; the head's is ``peak_lr · optim.head_lr_scale``. The backbone is stepped
    through its engine (``make_engine``; default: the bare backbone in this process), which owns its gradient sum,
    clipping and the layout of its optimizer state.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: ShardedHead,
        cfg: OptimConfig,
        peak_lr: float,
        sample_update: SampleUpdate,
        amp: Amp,
        device: torch.device,
        schedule: Schedule,
        make_engine: EngineFactory | None = None,
    ) -> None:
        self.cfg, self.backbone, self.head = cfg, backbone, head
        self.backbone_optimizer = build_backbone_optimizer(backbone, cfg, peak_lr)
        self.head_optimizer = build_head_optimizer(head, cfg, peak_lr * cfg.head_lr_scale, sample_update)
        self.optimizers = (self.backbone_optimizer, self.head_optimizer)
        self.peak_lrs = [[group["lr"] for group in opt.param_groups] for opt in self.optimizers]
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        """Loss scaling for fp16 autocast (a pass-through otherwise)."""
        if make_engine is None:
            self.engine: BackboneEngine = DDPEngine(backbone, self.backbone_optimizer, self.grad_scaler, backbone)
        else:
            self.engine = make_engine(self.backbone_optimizer, self.grad_scaler)
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
        return self.engine.clip_grad_norm(self.cfg.grad_clip)

    def step(self, apply: bool = True, head_rows: Tensor | None = None) -> None:
        """Step both optimizers (unless ``apply`` is false: the weights stay as they are), the head's on
        ``head_rows`` (the Partial-FC rows scored this step; None: every row), update the loss scaler and
        advance the schedule. Call ``unscale_and_clip`` first."""
        if apply:
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
        """Collective under DeepSpeed: the backbone optimizer (in the torch optimizer's layout, whatever the engine),
        the schedulers and the loss scaler (the head optimizer's state is checkpointed with the head shard, by class
        rows)."""
        return {
            "backbone_optimizer": self.engine.optimizer_state_dict(),
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "grad_scaler": self.grad_scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` but the backbone optimizer (the engine loads it with the weights,
        ``BackboneEngine.load``); checkpoints older than the schedulers and the scaler hold the optimizer only.

        Learning rates come from the config and the schedule (``restart``), not from the checkpoint.
        """
        for scheduler, saved in zip(self.schedulers, state.get("schedulers") or [], strict=False):
            scheduler.load_state_dict(saved)
        if state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.schedulers = self._schedulers(self.schedulers[0].last_epoch)
