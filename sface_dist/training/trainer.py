"""The training loop: data-parallel backbone, class-sharded SFace head.

One ``Trainer`` per rank. Each optimizer step: ``train.grad_accum`` micro-steps of backbone forward on the
local batch, head forward on the gathered batch (loss = global-batch loss) and backward, the backbone's
gradient summed across ranks on the last one only; then ``optimization.Optimization`` unscales, clips and
steps both optimizers and the schedule. Step metrics stay on the device until a log step reads them.

Progress is counted in samples (``checkpoint.Progress``), so the schedule, the run's
length and the epoch position survive a resume at another world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from sface_dist.backbones import build_backbone, compile_backbone
from sface_dist.checkpoint import (
    CheckpointError,
    Progress,
    TrainerState,
    restore_rng_state,
    rng_state,
    state_dict_mismatch,
)
from sface_dist.config import Config, OnNonFinite, to_dict
from sface_dist.data.errors import DataError
from sface_dist.data.loader import build_loader
from sface_dist.evaluation.monitor import VerificationMonitor
from sface_dist.evaluation.verification import VerificationResult
from sface_dist.heads import HeadOutput, ShardedSFaceHead, build_head, check_shard_fits
from sface_dist.parallel.agreement import control_group, naming_collective_failures, raise_on_any_rank
from sface_dist.parallel.collectives import all_reduce_max
from sface_dist.parallel.launch import DistEnv
from sface_dist.training.checkpoint_manager import CheckpointManager, Resumed
from sface_dist.training.engine import build_engine
from sface_dist.training.optimization import Optimization, Schedule
from sface_dist.training.run_directory import claim_run_directory, record_start
from sface_dist.training.stop_signals import StopRequest, signal_name, stop_at_step_boundary


@dataclass
class StepMetrics:
    """An optimizer step's metrics on the host (the mean over its micro-batches)."""

    loss: float
    cos_target: float
    cos_nontarget: float
    accuracy: float
    diagnostics: dict[str, float]
    """The head type's own terms (``HeadOutput.diagnostics``), logged after the loss."""

    @classmethod
    def from_tensor(cls, values: Tensor, diagnostic_names: tuple[str, ...]) -> StepMetrics:
        """Read a ``metric_tensor`` (one host sync); ``diagnostic_names`` name its entries after the fourth."""
        loss, cos_target, cos_nontarget, accuracy, *terms = values.tolist()
        return cls(loss, cos_target, cos_nontarget, accuracy, dict(zip(diagnostic_names, terms, strict=True)))

    def scalars(self) -> dict[str, float]:
        """Every metric by name, the head's terms included."""
        return {"loss": self.loss, **self.diagnostics, "cos_target": self.cos_target,
                "cos_nontarget": self.cos_nontarget, "accuracy": self.accuracy}


def metric_tensor(out: HeadOutput) -> Tensor:
    """The ``StepMetrics`` of a head output, stacked on the device (no host sync): loss, cos_target,
    cos_nontarget, accuracy, then ``out.diagnostics`` in their order."""
    return torch.stack(
        [out.loss.detach(), out.cos_target, out.cos_nontarget, out.accuracy, *out.diagnostics.values()]
    )


CHECKED = ("loss", "backbone gradient", "head gradient")
"""What an optimizer step checks for NaN and inf, in the order of ``NonFiniteWatch``'s flags."""


class NonFiniteWatch:
    """Non-finite losses and gradients, by ``train.on_nonfinite``.

    ``stop`` keeps the first bad (step, quantity) on the device, read at log steps (no host sync a step);
    ``skip`` agrees across ranks and reads the outcome every step (one host sync a step), so that every
    rank skips the same steps, and stops after ``max_nonfinite`` in a row.
    """

    def __init__(self, policy: OnNonFinite, max_in_a_row: int, rank: int, device: torch.device) -> None:
        self.policy, self.max_in_a_row, self.rank = policy, max_in_a_row, rank
        self.step = torch.zeros((), dtype=torch.long, device=device)
        """This step's number, counted on the device."""
        self.first = torch.full((3,), -1, dtype=torch.long, device=device)
        """``stop``: (step, quantity, rank) of the first non-finite step; -1 while there is none."""
        self.in_a_row = 0
        self.streak_start: tuple[int, int, int] | None = None
        self.skipped = 0

    def update(self, step: int, finite: Tensor) -> bool:
        """Record this step's flags (one per ``CHECKED``); whether to apply the step's update."""
        self.step += 1
        if self.policy == "stop":
            bad = ~finite.all()
            found = torch.stack([self.step, (~finite).int().argmax(), torch.full_like(self.step, self.rank)])
            self.first = torch.where((self.first[0] < 0) & bad, found, self.first)
            return True
        ranks = all_reduce_max(torch.where(finite, 0, self.rank + 1).long(), None).tolist()
        if not any(ranks):
            self.in_a_row, self.streak_start = 0, None
            return True
        quantity = next(i for i, rank in enumerate(ranks) if rank)
        if self.streak_start is None:
            self.streak_start = (step, quantity, ranks[quantity] - 1)
        self.in_a_row += 1
        self.skipped += 1
        return False

    def describe(self, step: int, quantity: int, rank: int) -> str:
        return f"step {step}: the {CHECKED[quantity]} is not finite on rank {rank}"

    def error(self, kept: str) -> FloatingPointError | None:
        """This rank's error when the run must stop (reads the device record under ``stop``)."""
        hint = "lower optim.lr or enable head.check_inputs to find the offending rows"
        if self.policy == "skip":
            if self.streak_start is None or self.in_a_row < self.max_in_a_row:
                return None
            first = self.describe(*self.streak_start)
            return FloatingPointError(
                f"{first} and on the {self.in_a_row - 1} steps after it (train.max_nonfinite={self.max_in_a_row}): "
                f"stopped; {kept}; {hint}"
            )
        step, quantity, rank = self.first.tolist()
        if step < 0 or (CHECKED[quantity] != "head gradient" and self.rank != 0):
            return None
        return FloatingPointError(f"{self.describe(step, quantity, rank)} (the first such step); {kept}; {hint}")


def naming_run_collective_failures(what: str, cfg: Config, env: DistEnv) -> contextlib.AbstractContextManager[None]:
    """``parallel.agreement.naming_collective_failures`` for this rank of the run, ending with the timeout's key."""
    hint = f"train.collective_timeout_minutes={cfg.train.collective_timeout_minutes:g}"
    return naming_collective_failures(what, env.rank, env.world_size, hint)


class Trainer:
    """Builds every component from the config and runs the loop on this rank."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.output = Path(cfg.train.output)
        torch.manual_seed(cfg.train.seed)
        self.loader = build_loader(cfg.data, env.rank, env.world_size, cfg.train.seed, env.device)
        self.num_classes = self.loader.num_classes
        self.checkpoints = CheckpointManager(
            self.output,
            rank=env.rank,
            world_size=env.world_size,
            every=cfg.train.checkpoint_every,
            keep=cfg.train.keep_checkpoints,
            num_classes=self.num_classes,
            config=to_dict(cfg),
        )
        self.micro_batch = cfg.data.batch_size * env.world_size
        """Images in one micro-step, over all ranks."""
        self.global_batch = self.micro_batch * cfg.train.grad_accum
        """Images in one optimizer step, over all ranks."""
        self.base_lr = cfg.optim.lr * (self.global_batch / 512 if cfg.optim.scale_lr_with_batch else 1.0)
        self.progress = Progress(samples=0, epoch=0, epoch_samples=0, schedule_batch=self.global_batch)
        self.stop_signal = 0
        """The signal that stopped the run at a step boundary, a checkpoint written (0: it was not stopped)."""
        self.stop_request = StopRequest()
        """This process's stop signal, agreed on at the next step boundary (``fit`` installs the handlers)."""
        self.control = control_group(cfg.train.collective_timeout_minutes)
        """Where ranks agree on host-side outcomes (a bad batch on one rank stops all of them)."""

        check_shard_fits(self.num_classes, cfg.model.embedding_size, env.rank, env.world_size, cfg.optim.name,
                         env.device)
        backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size).to(env.device)
        if cfg.model.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = compile_backbone(backbone) if cfg.model.compile else backbone
        self.head = build_head(
            cfg.head, self.num_classes, cfg.model.embedding_size, process_group=None, seed=cfg.train.seed
        ).to(env.device)
        self.optimization = Optimization(
            backbone,
            self.head,
            cfg.optim,
            self.base_lr,
            cfg.head.sample_update,
            cfg.train.amp,
            env.device,
            self._schedule(),
            functools.partial(build_engine, cfg, backbone, env),
        )
        self.engine = self.optimization.engine
        self.model = self.engine.model
        self.watch = NonFiniteWatch(cfg.train.on_nonfinite, cfg.train.max_nonfinite, env.rank, env.device)
        self.step = 0
        self.finished_before: Path | None = None
        """The checkpoint of a run that had already finished when this one resumed it (nothing to train)."""
        self.diagnostic_names: tuple[str, ...] = ()
        """The names of the head's own terms in ``train_step``'s metric tensor (``HeadOutput.diagnostics``)."""
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

    def _schedule(self) -> Schedule:
        """The learning-rate schedule in steps of the run's first global batch, ending at the run's last step at
        this world size (``_planned_samples``)."""
        batch = self.progress.schedule_batch
        return Schedule(self.cfg.optim, self._planned_samples() / batch, self.loader.num_images // batch)

    def _planned_samples(self) -> int:
        """Samples trained on when the run ends at this world size: those done, and the steps left at this global
        batch. The run's first world size plans ``_schedule_samples``; another can train a few more (a step of
        another size, or an epoch that fits another number of steps)."""
        return self.progress.samples + self._steps_left() * self.global_batch

    def _open_run(self, cfg: Config) -> None:
        """Resume if asked; unless the run had already finished, record this start in the run's history and open
        TensorBoard and the verification monitor. A finished run writes nothing."""
        resumed = self._resume() if cfg.train.resume and not cfg.train.overwrite else None
        if resumed is not None and self._finished():
            self.finished_before = resumed.path
            return
        if self.env.is_main:
            record_start(self.output, cfg, self.step, self.env.world_size, resumed)
            # Events a killed session logged after the checkpoint it resumes from are hidden, not repeated.
            self.writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=self.step + 1)
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

    def _end_epoch_if_no_step_fits(self) -> bool:
        """End the epoch where the next global batch no longer fits in it (the loader's end too); at a resume on
        more ranks that can be before the first step. Whether it ended."""
        if self.loader.num_images - self.progress.epoch_samples >= self.global_batch:
            return False
        self.progress.epoch += 1
        self.progress.epoch_samples = 0
        return True

    def _finished(self) -> bool:
        if self.cfg.train.steps:
            return self.progress.samples >= self._schedule_samples()
        return self.progress.epoch >= self.cfg.train.epochs

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

    def _resume(self) -> Resumed | None:
        """Restore the newest checkpoint, if any, and say what changed since it (one line per key)."""
        resumed = self.checkpoints.resume(self.head.class_range)
        if resumed is None:
            return None
        path, state = resumed.path, resumed.trainer
        try:
            self.engine.load(state.backbone, state.backbone_optimizer)
        except RuntimeError as error:
            mismatch = state_dict_mismatch(error)
            raise CheckpointError(f"{path}: the backbone does not fit the config: {mismatch}") from None
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: the backbone optimizer state does not fit: {error}") from None
        try:
            self.optimization.load_state_dict({"schedulers": state.schedulers, "grad_scaler": state.grad_scaler})
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: the backbone optimizer state does not fit: {error}") from None
        restore_rng_state(state.rng)
        try:
            self.head.load_state_dict(resumed.head)
            self.optimization.head_optimizer.load_state_dict(resumed.head_optimizer)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None
        self.step = state.step
        self.progress = Progress(**state.progress)
        batch = self.progress.schedule_batch
        self.optimization.restart(self._schedule(), self.progress.samples / batch, self.global_batch / batch)
        done = f"{self.progress.samples} samples, epoch {self.progress.epoch}"
        self.log(f"resumed from {path} at step {self.step} ({done})")
        for change in resumed.changes:
            accepted = " (accepted: train.accept_changes)" if change.defines_the_run else ""
            self.log(f"changed since {path.name}: {change}{accepted}")
        if resumed.world_size not in (0, self.env.world_size):
            self.log(f"changed since {path.name}: world size: {resumed.world_size} -> {self.env.world_size} ranks")
        if self.global_batch != batch:
            self.log(self._plan_at_this_batch())
        return resumed

    def _plan_at_this_batch(self) -> str:
        """What a run resumed with another global batch than it started with will train, and where its schedule
        ends."""
        steps, planned, first = self._steps_left(), self._planned_samples(), self._schedule_samples()
        more = planned - first
        against = (f"{more} more than" if more > 0 else f"{-more} fewer than" if more < 0 else "as") + (
            f" at the {self.progress.schedule_batch} per step it started with")
        return (f"at {self.env.world_size} rank(s) x {self.cfg.data.batch_size}"
                f"{f' x {self.cfg.train.grad_accum}' if self.cfg.train.grad_accum > 1 else ''}: {steps} steps of "
                f"{self.global_batch} samples left; the run ends after {planned} samples ({against}), and so "
                "does its learning-rate schedule")

    def _non_finite(self) -> str | None:
        """The first backbone tensor or head shard holding NaN or inf, if any (one host sync when all are finite)."""
        tensors = {f"backbone {name}": t for name, t in self.backbone.state_dict().items() if t.is_floating_point()}
        tensors[f"head shard {self.head.class_range}"] = self.head.weight.detach()
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()])
        if bool(finite.all()):
            return None
        return next(name for name, ok in zip(tensors, finite.tolist(), strict=True) if not ok)

    def _last_checkpoint(self) -> str:
        """The newest checkpoint, said in a signal handler (so never raising)."""
        try:
            latest = self.checkpoints.latest()
        except (OSError, ValueError) as error:
            return f"the last checkpoint cannot be read ({error})"
        return f"the last checkpoint is {latest}" if latest else "no checkpoint was written yet"

    def _kept(self) -> str:
        latest = self.checkpoints.latest()
        return f"{latest.name} stays the latest checkpoint" if latest else "no checkpoint was written yet"

    def check_finite(self) -> None:
        """Collective: stop every rank when ``train.on_nonfinite`` says so (the one host read of ``stop``)."""
        with self.collective("all_reduce over the control group"):
            raise_on_any_rank(self.watch.error(self._kept()), self.control)

    def collective(self, what: str) -> contextlib.AbstractContextManager[None]:
        """A peer that hangs past ``train.collective_timeout_minutes`` or dies while ``what`` waits for it: one
        line naming ``what`` and this rank (``parallel.agreement.CollectiveError``)."""
        return naming_run_collective_failures(what, self.cfg, self.env)

    def save(self) -> Path:
        """Collective: write a checkpoint, unless a loss, gradient or weight is not finite on some rank (then
        every rank stops)."""
        with self.collective(f"a collective of the checkpoint of step {self.step}"):
            return self._save()

    def _save(self) -> Path:
        self.check_finite()
        bad = self._non_finite()
        error = None
        if bad is not None:
            error = FloatingPointError(
                f"step {self.step}: {bad} is not finite: no checkpoint written, {self._kept()} (lower optim.lr)"
            )
        raise_on_any_rank(error)
        state = TrainerState(
            step=self.step,
            backbone=self.engine.weights(),
            rng=rng_state(),
            progress=dataclasses.asdict(self.progress),
            **self.optimization.state_dict(),
        )
        return self.checkpoints.save(state, self.head.state_dict(), self.optimization.head_optimizer.state_dict())

    def evaluate(self) -> dict[str, VerificationResult]:
        """Collective: score every verification pack (logged and kept-best by the monitor)."""
        with self.collective(f"a collective of the evaluation at step {self.step}"):
            return self.monitor.run(self.backbone, self.step).results

    def train_step(self, batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """One optimizer step over ``train.grad_accum`` micro-batches (this rank's share of each): the gradient
        of the loss on their union. Returns the mean of the micro-steps' metrics (``StepMetrics`` order), on the
        device.

        Under Partial FC micro-step ``m`` of optimizer step ``t`` draws its own negatives from
        (``train.seed``, rank, ``t``, ``m``); the head optimizer updates the union of the rows they scored.
        """
        metrics = []
        sampled_rows = []
        for i, (images, labels) in enumerate(batches):
            if self.cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.engine.accumulate(last=i == len(batches) - 1):
                with self._autocast():
                    embeddings = self.model(images)
                out = self.head(embeddings.float(), labels, step=self.step + 1, micro_step=i)
                self.engine.backward(out.loss / len(batches))
            metrics.append(metric_tensor(out))
            if out.sampled_rows is not None:
                sampled_rows.append(out.sampled_rows)
        self.diagnostic_names = tuple(out.diagnostics)
        rows = torch.unique(torch.cat(sampled_rows)) if len(sampled_rows) > 1 else next(iter(sampled_rows), None)
        mean = torch.stack(metrics).mean(dim=0)
        backbone_norm = self.optimization.unscale_and_clip()
        apply = self.watch.update(self.step + 1, self._finite(mean[0], backbone_norm))
        if not apply:
            self.log(f"step {self.step + 1}: skipped ({self.watch.describe(*self.watch.streak_start)}, "
                     f"{self.watch.in_a_row} in a row)")
        self.optimization.step(apply, rows)
        self.optimization.zero_grad()
        if not apply:  # every rank took this branch: the outcome was agreed on
            error = self.watch.error(self._kept())
            raise_on_any_rank(error if self.env.is_main else None, self.control)
        return mean

    def _finite(self, loss: Tensor, backbone_norm: Tensor) -> Tensor:
        """One flag per ``CHECKED``. Under fp16 the gradients are the loss scaler's to check (an overflow there
        skips the step and lowers the scale)."""
        checked = [loss.float()]
        grad = self.head.weight.grad
        if self.cfg.train.amp == "fp16" or grad is None:
            checked += [loss.new_zeros((), dtype=torch.float32)] * 2
        else:
            checked += [backbone_norm.float(), torch.linalg.vector_norm(grad).float()]
        return torch.isfinite(torch.stack(checked))

    def _log_step(self, metrics: StepMetrics, lr: float, samples_per_s: float, started: float, start_step: int) -> None:
        done = self.step - start_step
        eta = (time.perf_counter() - started) / max(done, 1) * (self.total_steps - self.step)
        terms = " ".join(f"{name} {value:.3f}" for name, value in metrics.diagnostics.items())
        terms = f" ({terms})" if terms else ""
        skipped = f", {self.loader.skipped_records} bad records skipped" if self.loader.skipped_records else ""
        if self.watch.skipped:
            skipped += f", {self.watch.skipped} non-finite steps skipped"
        self.log(
            f"step {self.step}/{self.total_steps} loss {metrics.loss:.4f}{terms} acc {metrics.accuracy:.3f} "
            f"cos+ {metrics.cos_target:.3f} cos- {metrics.cos_nontarget:.3f} lr {lr:.4g} "
            f"{samples_per_s:.0f} samples/s ETA {eta / 60:.1f} min{skipped}"
        )
        if self.writer is not None:
            for name, value in metrics.scalars().items():
                self.writer.add_scalar(f"train/{name}", value, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/samples_per_s", samples_per_s, self.step)

    def fit(self) -> dict[str, VerificationResult]:
        """Train to the end of the schedule, checkpointing and evaluating on schedule; returns the final evaluation.

        On Ctrl-C, SIGTERM or SIGUSR1 (``stop_signals``) received by any rank, every rank stops at the next step
        boundary, writes a checkpoint and returns an empty result with ``stop_signal`` set.
        """
        cfg = self.cfg.train
        if self.finished_before is not None:
            length = f"train.steps={cfg.steps}" if cfg.steps else f"train.epochs={cfg.epochs}"
            self.log(f"{self.output}: the run finished at step {self.step} ({self.finished_before.name}, "
                     f"{length}): nothing to do; raise {length.split('=')[0]} to train on, or start a new run "
                     "(another train.output, or train.overwrite=true)")
            return {}
        self.log(
            f"training {self.cfg.model.backbone} on {self.loader.num_images} images of {self.num_classes} "
            f"identities: {self.env.world_size} rank(s) x {self.cfg.data.batch_size}, {self.total_steps} steps, "
            f"head {self.head_description()}, {self.head.class_end - self.head.class_start} classes on rank 0"
        )
        start_step, started = self.step, time.perf_counter()
        window_start, window_steps = time.perf_counter(), 0
        self.model.train()
        with stop_at_step_boundary(self.log, self._last_checkpoint) as self.stop_request:
            while not self._finished():
                if self._end_epoch_if_no_step_fits():
                    continue
                self._start_epoch()
                for batches in self._optimizer_batches():
                    lr = self.optimization.lr
                    with self.collective(f"a collective of step {self.step + 1}"):
                        metrics = self.train_step(batches)
                    self.step += 1
                    self._advance()
                    window_steps += 1
                    if self.step % cfg.log_every == 0 or self._finished():
                        self.check_finite()
                        elapsed = time.perf_counter() - window_start
                        samples_per_s = window_steps * self.global_batch / elapsed
                        step_metrics = StepMetrics.from_tensor(metrics, self.diagnostic_names)
                        self._log_step(step_metrics, lr, samples_per_s, started, start_step)
                        window_start, window_steps = time.perf_counter(), 0
                    if self._finished():
                        break
                    if self.checkpoints.due(self.step):
                        self.log(f"checkpoint {self.save()}")
                    if self.step % self.cfg.eval.every == 0:
                        self.check_finite()
                        self.evaluate()
                        self.model.train()
                if self.stop_signal:
                    name = signal_name(self.stop_signal)
                    self.log(f"interrupted at step {self.step} by {name}: checkpoint {self.save()}")
                    return {}
        self.log(f"checkpoint {self.save()}")
        return self.evaluate()

    def _advance(self) -> None:
        """Count one optimizer step's global batch."""
        self.progress.samples += self.global_batch
        self.progress.epoch_samples += self.global_batch
        self._end_epoch_if_no_step_fits()

    def _agreed_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The loader's batches, agreed on by every rank (one CPU all-reduce a micro-batch).

        A rank that meets a bad record stops with its one line; the others stop with it instead
        of failing later inside a collective the failed rank never joins. The same all-reduce carries
        this rank's stop signal: once any rank has one, every rank ends the batches here and sets
        ``stop_signal`` (the highest signal number asked for), so that all of them stop after the same step.
        """
        batches = iter(self.loader)
        while True:
            error: DataError | None = None
            try:
                batch = next(batches, None)
            except DataError as failure:
                batch, error = None, failure
            with self.collective("all_reduce over the control group"):
                self.stop_signal = raise_on_any_rank(error, self.control, stop=self.stop_request.signum)
            if batch is None or self.stop_signal:
                return
            yield batch

    def _optimizer_batches(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """This epoch's micro-batches on the device, ``train.grad_accum`` at a time; a partial group at the epoch's
        end is left out, like a partial batch."""
        epoch, group = self.progress.epoch, []
        for images, labels in self._agreed_batches():
            group.append((images.to(self.env.device, non_blocking=True), labels.to(self.env.device, non_blocking=True)))
            if len(group) < self.cfg.train.grad_accum:
                continue
            yield group
            group = []
            if self.progress.epoch != epoch:
                return

    def _start_epoch(self) -> None:
        """Point the loader at the current epoch position, on this world size's batch grid."""
        position = self.progress.epoch_samples
        if position % self.micro_batch == 0:
            self.loader.set_epoch(self.progress.epoch, skip_batches=position // self.micro_batch)
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
