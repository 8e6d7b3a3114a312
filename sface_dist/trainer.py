"""The training loop: data-parallel backbone, class-sharded SFace head.

One ``Trainer`` per rank. Each step: backbone forward on the local batch, head
forward on the gathered batch (loss = global-batch loss), backward, gradient
clipping, SGD on the backbone (replicated) and on this rank's head shard.

Progress is counted in samples (``checkpoint.Progress``), so the schedule, the run's
length and the epoch position survive a resume at another world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from sface_dist.backbones import build_backbone, compile_backbone
from sface_dist.checkpoint import (
    CheckpointError,
    Progress,
    TrainerState,
    latest_checkpoint,
    load_head_shard,
    load_trainer_state,
    read_manifest,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    state_dict_mismatch,
)
from sface_dist.config import Config, OptimConfig, save_config, to_dict
from sface_dist.data.errors import DataError
from sface_dist.data.loader import build_loader
from sface_dist.distributed import DistEnv, PeerError, control_group, data_parallel, raise_on_any_rank
from sface_dist.evaluation.monitor import VerificationMonitor
from sface_dist.evaluation.verification import VerificationResult
from sface_dist.heads import HeadOutput, ShardedSFaceHead, ShardSGD, build_head
from sface_dist.run_directory import claim_run_directory


def learning_rate(step: float, total_steps: float, base_lr: float, cfg: OptimConfig) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then polynomial decay to 0 at ``total_steps``.

    Steps are those of the run's schedule batch, fractional when a resumed run's global batch differs.
    """
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
        self.global_batch = cfg.data.batch_size * env.world_size
        self.base_lr = cfg.optim.lr * (self.global_batch / 512 if cfg.optim.scale_lr_with_batch else 1.0)
        self.progress = Progress(samples=0, epoch=0, epoch_samples=0, schedule_batch=self.global_batch)
        self.interrupted = False
        """Set when Ctrl-C stopped the run at a step boundary (a checkpoint was written)."""
        self.control = control_group()
        """Where ranks agree on host-side outcomes (a bad batch on one rank stops all of them)."""

        backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size).to(env.device)
        if cfg.model.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = compile_backbone(backbone) if cfg.model.compile else backbone
        self.model = data_parallel(backbone, env, grad_comm=cfg.train.grad_comm)
        self.head = build_head(
            cfg.head, self.num_classes, cfg.model.embedding_size, process_group=None, seed=cfg.train.seed
        ).to(env.device)
        self.backbone_optimizer = torch.optim.SGD(
            backbone.parameters(), lr=self.base_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
        self.head_optimizer = ShardSGD(
            self.head,
            lr=self.base_lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            sample_update=cfg.head.sample_update,
        )
        self.grad_scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.amp == "fp16")
        """Loss scaling for fp16 autocast (a pass-through otherwise)."""
        self.step = 0
        self.writer: SummaryWriter | None = None
        self.lock, moved = claim_run_directory(
            self.output, resume=cfg.train.resume, overwrite=cfg.train.overwrite, is_main=env.is_main
        )
        if moved:
            self.log(moved)
        try:
            self._open_run(cfg)
        except BaseException:
            self.close()
            raise
        self.total_steps = self.step + self._steps_left()

    def _open_run(self, cfg: Config) -> None:
        """Write the resolved config, open TensorBoard and the verification monitor, and resume if asked."""
        if self.env.is_main:
            save_config(cfg, self.output / "config.yaml")
            self.writer = SummaryWriter(str(self.output / "tensorboard"))
        self.monitor = VerificationMonitor(
            cfg.eval.bins,
            self.env,
            image_size=cfg.data.image_size,
            batch_size=cfg.eval.batch_size,
            flip=cfg.eval.flip,
            shared=cfg.eval.shared,
            writer=self.writer,
            best_dir=self.output / "best" if cfg.eval.keep_best else None,
            run_config=to_dict(cfg),
            log=self.log,
        )
        if cfg.train.resume and not cfg.train.overwrite:
            self._resume()

    def _schedule_samples(self) -> int:
        """Samples the whole run trains on: ``train.steps`` or ``train.epochs`` in the schedule batch."""
        batch = self.progress.schedule_batch
        if self.cfg.train.steps:
            return self.cfg.train.steps * batch
        return self.cfg.train.epochs * (self.loader.num_images // batch) * batch

    def _steps_left(self) -> int:
        """Optimizer steps at this world size until the run ends."""
        if self.cfg.train.steps:
            return max(0, math.ceil((self._schedule_samples() - self.progress.samples) / self.global_batch))
        epochs_left = self.cfg.train.epochs - self.progress.epoch
        if epochs_left <= 0:
            return 0
        this_epoch = (self.loader.num_images - self.progress.epoch_samples) // self.global_batch
        return this_epoch + (epochs_left - 1) * (self.loader.num_images // self.global_batch)

    def _finished(self) -> bool:
        if self.cfg.train.steps:
            return self.progress.samples >= self._schedule_samples()
        return self.progress.epoch >= self.cfg.train.epochs

    def _learning_rate(self) -> float:
        batch = self.progress.schedule_batch
        total = self._schedule_samples() / batch
        return learning_rate(self.progress.samples / batch, total, self.base_lr, self.cfg.optim)

    def head_description(self) -> str:
        head = self.cfg.head
        impl = f" ({self.head.impl})" if isinstance(self.head, ShardedSFaceHead) else ""
        sampling = "" if head.sample_rate >= 1.0 else f" ({self.head.sample_correction}, {head.sample_update} update)"
        return f"{head.type}{impl}, {head.precision}, sample rate {head.sample_rate}{sampling}"

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
        self._check_architecture(path)
        state = load_trainer_state(path)
        try:
            self.backbone.load_state_dict(state.backbone)
        except RuntimeError as error:
            mismatch = state_dict_mismatch(error)
            raise CheckpointError(f"{path}: the backbone does not fit the config: {mismatch}") from None
        try:
            self.backbone_optimizer.load_state_dict(state.backbone_optimizer)
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: the backbone optimizer state does not fit: {error}") from None
        restore_rng_state(state.rng)
        weight, momentum = load_head_shard(path, self.head.class_range, self.num_classes)
        if weight.shape != self.head.weight.shape:
            raise CheckpointError(
                f"{path}: head rows are {weight.shape[1]}-d, the config's model.embedding_size is "
                f"{self.head.weight.shape[1]}"
            )
        with torch.no_grad():
            self.head.weight.copy_(weight)
        if momentum is not None:
            self.head_optimizer.state[self.head.weight]["momentum_buffer"] = momentum.to(self.env.device)
        self.step = self.head.step = state.step
        self.progress = Progress(**state.progress)
        done = f"{self.progress.samples} samples, epoch {self.progress.epoch}"
        self.log(f"resumed from {path} at step {self.step} ({done})")

    def _check_architecture(self, path: Path) -> None:
        """One line naming the key when the checkpoint's model differs from the config's."""
        saved = read_manifest(path).get("config", {}).get("model", {})
        for key in ("backbone", "embedding_size"):
            if key in saved and saved[key] != getattr(self.cfg.model, key):
                raise CheckpointError(
                    f"{path}: model.{key} is {saved[key]!r} in the checkpoint and {getattr(self.cfg.model, key)!r} "
                    f"in the config: restore it, or start a new run (another train.output, or train.overwrite=true)"
                )

    def _non_finite(self) -> str | None:
        """The first backbone tensor or head shard holding NaN or inf, if any (one host sync when all are finite)."""
        tensors = {f"backbone {name}": t for name, t in self.backbone.state_dict().items() if t.is_floating_point()}
        tensors[f"head shard {self.head.class_range}"] = self.head.weight.detach()
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()])
        if bool(finite.all()):
            return None
        return next(name for name, ok in zip(tensors, finite.tolist(), strict=True) if not ok)

    def save(self) -> Path:
        """Collective: write a checkpoint, unless a weight is not finite on some rank (then every rank stops)."""
        bad = self._non_finite()
        error = None
        if bad is not None:
            latest = latest_checkpoint(self.checkpoints)
            kept = f"{latest.name} stays the latest checkpoint" if latest else "no checkpoint was written yet"
            error = FloatingPointError(
                f"step {self.step}: {bad} is not finite: no checkpoint written, {kept} (lower optim.lr)"
            )
        raise_on_any_rank(error)
        state = TrainerState(
            step=self.step,
            backbone=self.backbone.state_dict(),
            backbone_optimizer=self.backbone_optimizer.state_dict(),
            rng=rng_state(),
            progress=dataclasses.asdict(self.progress),
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
            if not self.env.is_main:
                raise PeerError("the loss is not finite (rank 0 reports it)")
            latest = latest_checkpoint(self.checkpoints)
            kept = f"; {latest.name} stays the latest checkpoint" if latest else ""
            raise FloatingPointError(
                f"step {self.step}: loss is {metrics.loss} (intra {metrics.intra}, inter {metrics.inter}){kept}; "
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
        """Train to the end of the schedule, checkpointing and evaluating on schedule; returns the final evaluation.

        A single-process run stops at the next step boundary on Ctrl-C, writes a checkpoint and
        returns an empty result with ``interrupted`` set (a second Ctrl-C stops at once).
        """
        cfg = self.cfg.train
        self.log(
            f"training {self.cfg.model.backbone} on {self.loader.num_images} images of {self.num_classes} "
            f"identities: {self.env.world_size} rank(s) x {self.cfg.data.batch_size}, {self.total_steps} steps, "
            f"head {self.head_description()}, {self.head.class_end - self.head.class_start} classes on rank 0"
        )
        start_step, started = self.step, time.perf_counter()
        window_start, window_steps = time.perf_counter(), 0
        self.model.train()
        with _interrupt_at_step_boundary(self.env.world_size == 1) as interrupt:
            while not self._finished():
                self._start_epoch()
                for images, labels in self._agreed_batches():
                    images = images.to(self.env.device, non_blocking=True)
                    labels = labels.to(self.env.device, non_blocking=True)
                    lr = self._learning_rate()
                    metrics = self.train_step(images, labels, lr)
                    self.step += 1
                    self._advance()
                    window_steps += 1
                    if self.step % cfg.log_every == 0 or self._finished():
                        elapsed = time.perf_counter() - window_start
                        self._log_step(metrics, lr, window_steps * self.global_batch / elapsed, started, start_step)
                        window_start, window_steps = time.perf_counter(), 0
                    if interrupt.is_set():
                        self.interrupted = True
                        self.log(f"interrupted at step {self.step}: checkpoint {self.save()}")
                        return {}
                    if self._finished():
                        break
                    if self.step % cfg.checkpoint_every == 0:
                        self.log(f"checkpoint {self.save()}")
                    if self.step % self.cfg.eval.every == 0:
                        self.evaluate()
                        self.model.train()
        self.log(f"checkpoint {self.save()}")
        return self.evaluate()

    def _advance(self) -> None:
        """Count one global batch; an epoch ends where the next batch no longer fits (the loader's end too)."""
        self.progress.samples += self.global_batch
        self.progress.epoch_samples += self.global_batch
        if self.loader.num_images - self.progress.epoch_samples < self.global_batch:
            self.progress.epoch += 1
            self.progress.epoch_samples = 0

    def _agreed_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The loader's batches, agreed on by every rank (one CPU all-reduce a step).

        A rank that meets a bad record stops with its one line; the others stop with it instead
        of failing later inside a collective the failed rank never joins.
        """
        batches = iter(self.loader)
        while True:
            error: DataError | None = None
            try:
                batch = next(batches, None)
            except DataError as failure:
                batch, error = None, failure
            raise_on_any_rank(error, self.control)
            if batch is None:
                return
            yield batch

    def _start_epoch(self) -> None:
        """Point the loader at the current epoch position, on this world size's batch grid."""
        position = self.progress.epoch_samples
        if position % self.global_batch == 0:
            self.loader.set_epoch(self.progress.epoch, skip_batches=position // self.global_batch)
        else:
            self.loader.set_epoch(self.progress.epoch, first_sample=position)

    def close(self) -> None:
        """Flush TensorBoard and release the run folder (idempotent)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


@contextlib.contextmanager
def _interrupt_at_step_boundary(enabled: bool) -> Iterator[threading.Event]:
    """The first SIGINT asks the loop to stop at the next step boundary; the second interrupts at once.

    Only in a single process on the main thread: ranks of a distributed run would have to agree
    on the step, and a launcher forwards signals on its own terms.
    """
    interrupt = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield interrupt
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        interrupt.set()
        print("\nCtrl-C: stopping after this step to write a checkpoint (press again to stop at once)", flush=True)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
