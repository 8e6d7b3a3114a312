"""The training loop: data-parallel backbone, class-sharded SFace head.

One ``Trainer`` per rank. It builds each component from its config section (the data loader, the backbone and
its engine, the head shard and its optimizer, the schedules, the verification monitor), hands the stateful ones
to ``CheckpointManager`` and runs the loop. Each optimizer step: ``train.grad_accum`` micro-steps of backbone
forward on the local batch, head forward on the gathered batch (loss = global-batch loss) and backward, the
backbone's gradient summed across ranks on the last one only; then ``optimization.Optimization`` unscales, clips
and steps both optimizers and the schedule. Step metrics stay on the device until a log step reads them.

Progress is counted in samples (``state.TrainingProgress``), so the schedule, the run's
length and the epoch position survive a resume at another world size.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.tensorboard import SummaryWriter

from sface_dist.backbones import build_backbone, compile_backbone
from sface_dist.config import Config, ModelConfig, to_dict
from sface_dist.console import say
from sface_dist.data.errors import DataError
from sface_dist.data.loader import FaceLoader, build_loader
from sface_dist.evaluation.checkpoint_backbone import load_backbone
from sface_dist.evaluation.monitor import VerificationMonitor
from sface_dist.evaluation.verification import VerificationResult
from sface_dist.heads import build_head, check_shard_fits
from sface_dist.parallel.agreement import control_group, naming_collective_failures, raise_on_any_rank
from sface_dist.parallel.launch import DistEnv
from sface_dist.stop_signals import StopRequest, signal_name, stop_at_step_boundary
from sface_dist.training.checkpoint_manager import CheckpointManager, Resumed
from sface_dist.training.cleaning import CleaningState, clean, drop_sub_centres
from sface_dist.training.engine import build_engine
from sface_dist.training.nonfinite import NonFiniteWatch
from sface_dist.training.optimization import (
    Optimization,
    Schedule,
    autocast,
    build_backbone_optimizer,
    build_grad_scaler,
    build_head_optimizer,
)
from sface_dist.training.profiling import StepProfiler
from sface_dist.training.run_directory import claim_run_directory, record_start
from sface_dist.training.state import RNGState, TrainingProgress
from sface_dist.training.step_metrics import DeviceMetrics, StepMetrics, metric_tensor


def naming_run_collective_failures(what: str, cfg: Config, env: DistEnv) -> contextlib.AbstractContextManager[None]:
    """``parallel.agreement.naming_collective_failures`` for this rank of the run, ending with the timeout's key."""
    hint = f"train.collective_timeout_minutes={cfg.train.collective_timeout_minutes:g}"
    return naming_collective_failures(what, env.rank, env.world_size, hint)


class AgreedBatches:
    """The loader's batches of one epoch, agreed on by every rank (one CPU all-reduce a micro-batch).

    A rank that meets a bad record stops with its one line; the others stop with it instead of failing later
    inside a collective the failed rank never joins. The same all-reduce carries this rank's stop signal: once
    any rank has one, every rank ends the batches here with ``stop_signal`` set (the highest signal number asked
    for), so that all of them stop after the same step.
    """

    def __init__(self, loader: FaceLoader, control: ProcessGroup | None, stop_request: StopRequest,
                 collective: Callable[[str], contextlib.AbstractContextManager[None]]) -> None:
        self.loader, self.control, self.stop_request, self.collective = loader, control, stop_request, collective
        self.stop_signal = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
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


def build_model(cfg: ModelConfig, device: torch.device) -> nn.Module:
    """``model``'s backbone on ``device``, channels-last and compiled in place as configured."""
    backbone = build_backbone(cfg.backbone, cfg.embedding_size).to(device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    return compile_backbone(backbone) if cfg.compile else backbone


class Trainer:
    """Builds every component from its config section and runs the loop on this rank."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.output = Path(cfg.train.output)
        torch.manual_seed(cfg.train.seed)
        self.loader = build_loader(cfg.data, env.rank, env.world_size, cfg.train.seed, env.device)
        self.num_classes = self.loader.num_classes
        self.micro_batch = cfg.data.batch_size * env.world_size
        """Images in one micro-step, over all ranks."""
        self.global_batch = self.micro_batch * cfg.train.grad_accum
        """Images in one optimizer step, over all ranks."""
        self.progress = TrainingProgress(step=0, samples=0, epoch=0, epoch_samples=0, schedule_batch=self.global_batch)
        self.cleaning = CleaningState.empty()
        """The images ``clean`` left out, and after which epochs."""
        self.control = control_group(cfg.train.collective_timeout_minutes)
        """Where ranks agree on host-side outcomes (a bad batch on one rank stops all of them)."""

        check_shard_fits(self.num_classes, cfg.model.embedding_size, env.rank, env.world_size, cfg.optim.name,
                         env.device, cfg.head.sub_centers)
        self.backbone = build_model(cfg.model, env.device)
        self.head = build_head(
            cfg.head, self.num_classes, cfg.model.embedding_size, process_group=None, seed=cfg.train.seed
        ).to(env.device)
        peak_lr = cfg.optim.lr * (self.global_batch / 512 if cfg.optim.scale_lr_with_batch else 1.0)
        backbone_optimizer = build_backbone_optimizer(self.backbone, cfg.optim, peak_lr)
        grad_scaler = build_grad_scaler(cfg.train.amp, env.device)
        self.engine = build_engine(cfg.train, cfg.deepspeed, self.backbone, backbone_optimizer, grad_scaler, env,
                                   micro_batch=cfg.data.batch_size, grad_clip=cfg.optim.grad_clip)
        head_optimizer = build_head_optimizer(self.head, cfg.optim, peak_lr * cfg.optim.head_lr_scale,
                                              cfg.head.sample_update)
        self.optimization = Optimization(self.engine, backbone_optimizer, head_optimizer, grad_scaler,
                                         cfg.optim.grad_clip, self._schedule())
        self.checkpoints = CheckpointManager(
            self.output,
            rank=env.rank,
            world_size=env.world_size,
            every=cfg.train.checkpoint_every,
            keep=cfg.train.keep_checkpoints,
            num_classes=self.num_classes,
            config=to_dict(cfg),
            trainer_state={"backbone": self.engine, "optimization": self.optimization, "rng": RNGState(),
                           "progress": self.progress, "cleaning": self.cleaning},
            head_shard={"head": self.head, "optimizer": head_optimizer},
            class_range=self.head.class_range,
        )
        self.watch = NonFiniteWatch(cfg.train.on_nonfinite, cfg.train.max_nonfinite, env.rank, env.device)
        self.profiler = StepProfiler(cfg.train.profile, self.output, env.rank, env.device)
        self.stop_signal = 0
        """``fit``'s outcome: the signal that stopped the run at a step boundary, a checkpoint written (0: it was
        not stopped)."""
        self.finished_before: Path | None = None
        """The checkpoint of a run that had already finished when this one resumed it (nothing to train)."""
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
        self.total_steps = self.progress.step + self._steps_left()

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
        if len(self.cleaning.excluded):
            self.loader.exclude(self.cleaning.excluded)
        if resumed is None and cfg.train.init_backbone:
            self._init_backbone(cfg.train.init_backbone)
        if resumed is not None and self._finished():
            self.finished_before = resumed.path
            return
        if self.env.is_main:
            record_start(self.output, cfg, self.progress.step, self.env.world_size, resumed)
            # Events a killed session logged after the checkpoint it resumes from are hidden, not repeated.
            self.writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=self.progress.step + 1)
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
        )

    def _init_backbone(self, path: str) -> None:
        """Start from the backbone weights at ``path`` (``train.init_backbone``), every rank reading them."""
        loaded = load_backbone(path)
        wanted = (self.cfg.model.backbone, self.cfg.model.embedding_size)
        if (loaded.backbone, loaded.embedding_size) != wanted:
            raise ValueError(f"train.init_backbone {path}: holds a {loaded.backbone} ({loaded.embedding_size}-d); "
                             f"the config trains a {wanted[0]} ({wanted[1]}-d) (model.backbone, model.embedding_size)")
        self.engine.load_weights(loaded.model.state_dict())
        self.log(f"backbone from {loaded.description}; a fresh head")

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
        self.progress.end_epoch()
        return True

    def _finished(self) -> bool:
        if self.cfg.train.steps:
            return self.progress.samples >= self._schedule_samples()
        return self.progress.epoch >= self.cfg.train.epochs

    def head_description(self) -> str:
        head = self.cfg.head
        impl = f" ({self.head.impl})" if self.head.impl else ""
        sampling = "" if head.sample_rate >= 1.0 else f" ({self.head.sample_correction}, {head.sample_update} update)"
        return f"{head.type}{impl}, {head.precision}, sample rate {head.sample_rate}{sampling}"

    def log(self, message: str) -> None:
        say(message, self.env.rank)

    def _resume(self) -> Resumed | None:
        """Restore the newest checkpoint, if any, continue its schedule, and say what changed since it (one line
        per key)."""
        resumed = self.checkpoints.restore()
        if resumed is None:
            return None
        path = resumed.path
        batch = self.progress.schedule_batch
        self.optimization.restart(self._schedule(), self.progress.samples / batch, self.global_batch / batch)
        done = f"{self.progress.samples} samples, epoch {self.progress.epoch}"
        self.log(f"resumed from {path} at step {self.progress.step} ({done})")
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

    @property
    def step(self) -> int:
        """Optimizer steps taken by the run (``progress.step``)."""
        return self.progress.step

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
        return self.checkpoints.save()

    def evaluate(self) -> dict[str, VerificationResult]:
        """Collective: score every verification pack (logged and kept-best by the monitor)."""
        with self.collective(f"a collective of the evaluation at step {self.step}"):
            return self.monitor.run(self.backbone, self.step).results

    def train_step(self, batches: Sequence[tuple[Tensor, Tensor]]) -> DeviceMetrics:
        """One optimizer step over ``train.grad_accum`` micro-batches (this rank's share of each): the gradient
        of the loss on their union. Returns the mean of the micro-steps' metrics, on the device.

        Under Partial FC micro-step ``m`` of optimizer step ``t`` draws its own negatives from
        (``train.seed``, rank, ``t``, ``m``); the head optimizer updates the union of the rows they scored.
        """
        metrics = []
        sampled_rows = []
        frozen = self.step < self.cfg.train.freeze_backbone_steps
        for i, (images, labels) in enumerate(batches):
            if self.cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.engine.accumulate(last=i == len(batches) - 1):
                with autocast(self.cfg.train.amp, self.env.device), torch.set_grad_enabled(not frozen):
                    embeddings = self.engine.model(images)
                out = self.head(embeddings.float(), labels, step=self.step + 1, micro_step=i)
                self.engine.backward(out.loss / len(batches))
            metrics.append(metric_tensor(out))
            if out.sampled_rows is not None:
                sampled_rows.append(out.sampled_rows)
        rows = torch.unique(torch.cat(sampled_rows)) if len(sampled_rows) > 1 else next(iter(sampled_rows), None)
        mean = torch.stack(metrics).mean(dim=0)
        backbone_norm = self.optimization.unscale_and_clip()
        apply = self.watch.update(self.step + 1, self._finite(mean[0], backbone_norm))
        if not apply:
            self.log(f"step {self.step + 1}: skipped ({self.watch.describe(*self.watch.streak_start)}, "
                     f"{self.watch.in_a_row} in a row)")
        self.optimization.step(apply, rows, backbone=not frozen)
        self.optimization.zero_grad()
        if not apply:  # every rank took this branch: the outcome was agreed on
            error = self.watch.error(self._kept())
            raise_on_any_rank(error if self.env.is_main else None, self.control)
        return DeviceMetrics(mean, tuple(out.diagnostics))

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
        self.engine.model.train()
        with stop_at_step_boundary(self.log, self._last_checkpoint) as stop_request:
            while not self._finished():
                if self._end_epoch_if_no_step_fits():
                    continue
                self._drop_sub_centres_if_due()
                self._clean_if_due()
                self._start_epoch()
                batches = AgreedBatches(self.loader, self.control, stop_request, self.collective)
                for group in self._optimizer_batches(batches):
                    lr = self.optimization.lr
                    with self.collective(f"a collective of step {self.step + 1}"), self.profiler.step(self.step + 1):
                        metrics = self.train_step(group)
                    if self.step + 1 == self.profiler.last:
                        self.log(f"profile of steps {self.profiler.first}-{self.profiler.last}: {self.profiler.path} "
                                 "(one file per rank; Perfetto or TensorBoard's profiler)")
                    self.progress.advance(self.global_batch)
                    self._end_epoch_if_no_step_fits()
                    window_steps += 1
                    if self.step % cfg.log_every == 0 or self._finished():
                        self.check_finite()
                        elapsed = time.perf_counter() - window_start
                        samples_per_s = window_steps * self.global_batch / elapsed
                        self._log_step(metrics.read(), lr, samples_per_s, started, start_step)
                        window_start, window_steps = time.perf_counter(), 0
                    if self._finished():
                        break
                    if self.checkpoints.due(self.step):
                        self.log(f"checkpoint {self.save()}")
                    if self.step % self.cfg.eval.every == 0:
                        self.check_finite()
                        self.evaluate()
                        self.engine.model.train()
                if batches.stop_signal:
                    self.stop_signal = batches.stop_signal
                    self.log(f"interrupted at step {self.step} by {signal_name(self.stop_signal)}: "
                             f"checkpoint {self.save()}")
                    return {}
        self.log(f"checkpoint {self.save()}")
        return self.evaluate()

    def _exclude_and_save(self, what: str, advice: str, line: str, scalars: dict[str, float]) -> None:
        """After a drop or a cleaning (``what``): leave ``self.cleaning.excluded`` out of later epochs (the loader's
        one line, prefixed with ``what`` and followed by ``advice``, when too few images are left), log ``line``,
        write ``clean/<name>`` scalars and ``clean/excluded`` to TensorBoard, and a checkpoint."""
        try:
            self.loader.exclude(self.cleaning.excluded)
        except DataError as error:
            raise DataError(f"{what}: {error}: {advice}") from None
        self.log(line)
        if self.writer is not None:
            for name, value in {**scalars, "excluded": len(self.cleaning.excluded)}.items():
                self.writer.add_scalar(f"clean/{name}", value, self.step)
        self.log(f"checkpoint {self.save()}")

    def _drop_sub_centres_if_due(self) -> None:
        """Collective: at the start of the epoch after ``head.sub_center_drop_epoch``, the sub-centre drop step
        (``cleaning.drop_sub_centres``), then a checkpoint."""
        epoch, drop_after = self.progress.epoch, self.cfg.head.sub_center_drop_epoch
        if not drop_after or self.progress.epoch_samples or epoch != drop_after or self.cleaning.dropped_after:
            return
        with self.collective(f"a collective of the sub-centre drop after epoch {epoch}"):
            report = drop_sub_centres(self.backbone, self.head, self.optimization.head_optimizer, self.loader.dataset,
                                      self.cfg.clean, self.cfg.head.sub_center_drop_degrees, self.env, self.cleaning,
                                      epoch)
        self._exclude_and_save(f"the sub-centre drop after epoch {epoch}", "drop later (head.sub_center_drop_epoch) "
                               "or at a wider angle (head.sub_center_drop_degrees)",
                               report.line(self.cfg.head.sub_center_drop_degrees), {})

    def _clean_if_due(self) -> None:
        """Collective: at the start of the epoch after one ``clean.at_epochs`` names, score every training image,
        leave the suspects out of this and every later epoch and write a checkpoint (a resume never cleans
        twice)."""
        epoch = self.progress.epoch
        due = epoch in self.cfg.clean.at_epochs and epoch not in self.cleaning.cleaned_epochs
        if self.progress.epoch_samples or not due:
            return
        with self.collective(f"a collective of the cleaning after epoch {epoch}"):
            report = clean(self.backbone, self.head, self.loader.dataset, self.cfg.clean, self.env, self.cleaning,
                           epoch, self.output)
        planted = {} if report.precision is None else {"precision": report.precision, "recall": report.recall}
        self._exclude_and_save(f"cleaning after epoch {epoch}", "clean later (clean.at_epochs), once the model tells "
                               "its identities apart", report.line(), {"suspects": len(report.suspects), **planted})

    def _optimizer_batches(self, batches: AgreedBatches) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """This epoch's micro-batches on the device, ``train.grad_accum`` at a time; a partial group at the epoch's
        end is left out, like a partial batch."""
        epoch, group = self.progress.epoch, []
        for images, labels in batches:
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
        """Stop a trace in progress, flush TensorBoard and release the run folder (idempotent)."""
        self.profiler.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
