"""The training loop: data-parallel backbone, class-sharded SFace head.

One ``Trainer`` per rank. Each step: backbone forward on the local batch, head
forward on the gathered batch (loss = global-batch loss), backward, gradient
clipping, SGD on the backbone (replicated) and on this rank's head shard.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from sface_dist.backbones import build_backbone
from sface_dist.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_head_shard,
    load_trainer_state,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from sface_dist.config import Config, OptimConfig, save_config, to_dict
from sface_dist.data.loader import build_loader
from sface_dist.distributed import DistEnv, data_parallel
from sface_dist.evaluation.monitor import VerificationMonitor
from sface_dist.evaluation.verification import VerificationResult
from sface_dist.heads import HeadOutput, ShardedSFaceHead, ShardSGD, build_head


def learning_rate(step: int, total_steps: int, base_lr: float, cfg: OptimConfig) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then polynomial decay to 0 at ``total_steps``."""
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return base_lr * (1.0 - progress) ** cfg.poly_power


@dataclass
class StepMetrics:
    loss: float
    intra: float
    inter: float
    cos_target: float
    cos_nontarget: float
    accuracy: float

    @classmethod
    def from_output(cls, out: HeadOutput) -> StepMetrics:
        values = torch.stack(
            [out.loss.detach(), out.intra, out.inter, out.cos_target, out.cos_nontarget, out.accuracy]
        ).tolist()
        return cls(*values)


class Trainer:
    """Builds every component from the config and runs the loop on this rank."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.output = Path(cfg.train.output)
        self.checkpoints = self.output / "checkpoints"
        torch.manual_seed(cfg.train.seed)
        self.loader = build_loader(cfg.data, env.rank, env.world_size, cfg.train.seed, env.device)
        self.num_classes = self.loader.num_classes
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data: {self.loader.num_images} images cannot fill one global batch of "
                f"{cfg.data.batch_size} x {env.world_size} ranks"
            )
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch
        global_batch = cfg.data.batch_size * env.world_size
        self.base_lr = cfg.optim.lr * (global_batch / 512 if cfg.optim.scale_lr_with_batch else 1.0)

        backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size).to(env.device)
        if cfg.model.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = backbone
        self.model = data_parallel(backbone, env)
        self.head = build_head(
            cfg.head, self.num_classes, cfg.model.embedding_size, process_group=None, seed=cfg.train.seed
        ).to(env.device)
        self.backbone_optimizer = torch.optim.SGD(
            backbone.parameters(), lr=self.base_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
        self.head_optimizer = ShardSGD(
            self.head, lr=self.base_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
        self.grad_scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.amp == "fp16")
        """Loss scaling for fp16 autocast (a pass-through otherwise)."""
        self.step = 0
        self.writer: SummaryWriter | None = None
        if env.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output / "config.yaml")
            self.writer = SummaryWriter(str(self.output / "tensorboard"))
        self.monitor = VerificationMonitor(
            cfg.eval.bins,
            env,
            image_size=cfg.data.image_size,
            batch_size=cfg.eval.batch_size,
            flip=cfg.eval.flip,
            shared=cfg.eval.shared,
            writer=self.writer,
            best_dir=self.output / "best" if cfg.eval.keep_best else None,
            run_config=to_dict(cfg),
            log=self.log,
        )
        if cfg.train.resume:
            self._resume()

    def head_description(self) -> str:
        head = self.cfg.head
        impl = f" ({self.head.impl})" if isinstance(self.head, ShardedSFaceHead) else ""
        return f"{head.type}{impl}, {head.precision}, sample rate {head.sample_rate}"

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        amp = self.cfg.train.amp
        if amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.env.device.type, dtype=dtype)

    def _resume(self) -> None:
        path = latest_checkpoint(self.checkpoints)
        if path is None:
            return
        state = load_trainer_state(path)
        self.backbone.load_state_dict(state.backbone)
        self.backbone_optimizer.load_state_dict(state.backbone_optimizer)
        restore_rng_state(state.rng)
        weight, momentum = load_head_shard(path, self.head.class_range, self.num_classes)
        with torch.no_grad():
            self.head.weight.copy_(weight)
        if momentum is not None:
            self.head_optimizer.state[self.head.weight]["momentum_buffer"] = momentum.to(self.env.device)
        self.step = self.head.step = state.step
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        state = TrainerState(
            step=self.step,
            backbone=self.backbone.state_dict(),
            backbone_optimizer=self.backbone_optimizer.state_dict(),
            rng=rng_state(),
        )
        return save_checkpoint(
            self.checkpoints,
            rank=self.env.rank,
            world_size=self.env.world_size,
            trainer_state=state,
            head_weight=self.head.weight,
            head_optimizer=self.head_optimizer,
            class_range=self.head.class_range,
            num_classes=self.num_classes,
            config=to_dict(self.cfg),
            keep=self.cfg.train.keep_checkpoints,
        )

    def evaluate(self) -> dict[str, VerificationResult]:
        """Collective: score every verification pack (logged and kept-best by the monitor)."""
        return self.monitor.run(self.backbone, self.step).results

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> StepMetrics:
        for optimizer in (self.backbone_optimizer, self.head_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = lr
        if self.cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            embeddings = self.model(images)
        out = self.head(embeddings.float(), labels)
        self.grad_scaler.scale(out.loss).backward()
        if self.cfg.optim.grad_clip > 0:
            self.grad_scaler.unscale_(self.backbone_optimizer)
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.optim.grad_clip)
        self.grad_scaler.step(self.backbone_optimizer)
        self.grad_scaler.step(self.head_optimizer)
        self.grad_scaler.update()
        self.backbone_optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        metrics = StepMetrics.from_output(out)
        if not math.isfinite(metrics.loss):
            raise FloatingPointError(
                f"step {self.step}: loss is {metrics.loss} (intra {metrics.intra}, inter {metrics.inter}); "
                "lower optim.lr or enable head.check_inputs to find the offending rows"
            )
        return metrics

    def _log_step(self, metrics: StepMetrics, lr: float, samples_per_s: float, started: float, start_step: int) -> None:
        done = self.step - start_step
        eta = (time.perf_counter() - started) / max(done, 1) * (self.total_steps - self.step)
        terms = f" (intra {metrics.intra:.3f} inter {metrics.inter:.3f})" if self.cfg.head.type == "sface" else ""
        skipped = f", {self.loader.skipped_records} bad records skipped" if self.loader.skipped_records else ""
        self.log(
            f"step {self.step}/{self.total_steps} loss {metrics.loss:.4f}{terms} acc {metrics.accuracy:.3f} "
            f"cos+ {metrics.cos_target:.3f} cos- {metrics.cos_nontarget:.3f} lr {lr:.4g} "
            f"{samples_per_s:.0f} samples/s ETA {eta / 60:.1f} min{skipped}"
        )
        if self.writer is not None:
            for name, value in metrics.__dict__.items():
                self.writer.add_scalar(f"train/{name}", value, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/samples_per_s", samples_per_s, self.step)

    def fit(self) -> dict[str, VerificationResult]:
        """Train to ``total_steps``, checkpointing and evaluating on schedule; returns the final evaluation."""
        cfg = self.cfg.train
        self.log(
            f"training {self.cfg.model.backbone} on {self.loader.num_images} images of {self.num_classes} "
            f"identities: {self.env.world_size} rank(s) x {self.cfg.data.batch_size}, {self.total_steps} steps, "
            f"head {self.head_description()}, {self.head.class_end - self.head.class_start} classes on rank 0"
        )
        global_batch = self.cfg.data.batch_size * self.env.world_size
        start_step, started = self.step, time.perf_counter()
        window_start, window_steps = time.perf_counter(), 0
        self.model.train()
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            self.loader.set_epoch(epoch, skip_batches=skip)
            for images, labels in self.loader:
                images = images.to(self.env.device, non_blocking=True)
                labels = labels.to(self.env.device, non_blocking=True)
                lr = learning_rate(self.step, self.total_steps, self.base_lr, self.cfg.optim)
                metrics = self.train_step(images, labels, lr)
                self.step += 1
                window_steps += 1
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    self._log_step(metrics, lr, window_steps * global_batch / elapsed, started, start_step)
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.log(f"checkpoint {self.save()}")
                if self.step % self.cfg.eval.every == 0 and self.step < self.total_steps:
                    self.evaluate()
                    self.model.train()
                if self.step >= self.total_steps:
                    break
        self.log(f"checkpoint {self.save()}")
        results = self.evaluate()
        if self.writer is not None:
            self.writer.close()
        return results
