"""Per-rank memory of a training configuration before it is launched: what each part of a training step holds.

``plan_memory`` sizes, for one rank of ``world_size``, what the whole step holds (the backbone's fp32 weights and
optimizer state as the engine partitions them: DDP's all-reduce buckets, ZeRO's fp32 master partition and
ZeRO-2's reduce bucket; the head's weight shard and optimizer state; the input batch) and what three phases of
the step add to it: the end of the forward pass (every activation the backbone saved for its backward, traced by
running it on 2 and 4 images on the CPU under the configured autocast, and the head's working set: gathered
embeddings, sampled weight rows, the block's cosines, its gradient), the backbone's backward (activations freed
as gradients arrive, walked operation by operation) and the optimizer step (the gradients and the temporaries of
weight decay). The peak is the held bytes plus the largest phase.

``measure_step_peak`` is the measured reference: the most bytes allocated at once (``torch.profiler``'s
allocation events, ``AllocationTrace``) while a real ``Trainer`` is built and trains two steps.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile

from sface_dist.backbones import build_backbone
from sface_dist.config import Amp, Config
from sface_dist.heads.sface import auto_chunk_size, chunk_temporary_bytes
from sface_dist.parallel.launch import DistEnv
from sface_dist.parallel.partition import class_range
from sface_dist.training.optimization import autocast
from sface_dist.training.trainer import Trainer

FP32 = 4
OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}
"""fp32 values per weight the optimizers keep: SGD's momentum, AdamW's two moments."""
MARGIN_LOGIT_COPIES = 6
"""[B, C] fp32 tensors a margin head (and the dense SFace block) holds at its peak: the cosines, the target-masked
logits, their scaled copy, the softmax it saves, a masked copy for the statistics and the backward's gradient."""
NORMALISED_ROW_COPIES = 5
"""[C, D] tensors of a margin head's normalised weight rows at its backward: the rows, their gradient and the
three temporaries of ``normalize``'s backward (the logits are freed by then, the head's gradient not yet made)."""
ACTIVATION_GRADIENTS = 3
"""Gradients the size of an operation's saved input it holds during its backward: the one coming in, the one it
computes and a contiguous copy (a convolution's backward, the largest)."""
Phase = Literal["held", "forward", "backward", "step"]
PHASES: dict[Phase, str] = {
    "held": "held through the step",
    "forward": "at the end of the forward pass",
    "backward": "during the backbone's backward pass",
    "step": "at the optimizer step",
}


@dataclass(frozen=True)
class MemoryLine:
    part: str
    bytes: int
    phase: Phase
    how: str
    """The arithmetic, in words."""


@dataclass(frozen=True)
class MemoryPlan:
    world_size: int
    engine: str
    lines: tuple[MemoryLine, ...]

    def phase_bytes(self, phase: Phase) -> int:
        return sum(line.bytes for line in self.lines if line.phase == phase)

    @property
    def peak_phase(self) -> Phase:
        return max(("forward", "backward", "step"), key=self.phase_bytes)

    @property
    def peak(self) -> int:
        return self.phase_bytes("held") + self.phase_bytes(self.peak_phase)


@dataclass(frozen=True)
class BackwardProfile:
    """The backbone's forward as its backward pass will undo it, event by event: ``saved[i]`` bytes an operation
    saved, ``grads[i]`` the fp32 gradient bytes of a module's parameters (at the module's start: their gradients
    arrive once the backward is past it); ``unsaved_grads``: parameters used outside a module's call, counted
    from the backward's start."""

    saved: tuple[int, ...]
    grads: tuple[int, ...]
    unsaved_grads: int
    output: int

    def end_of_forward(self) -> int:
        return sum(self.saved) + self.output

    def backward_peak(self, gradient_cap: int | None = None, copies: int = 1) -> int:
        """Most bytes of saved activations and gradients held at once while the backward walks the forward in
        reverse, freeing what an operation saved once it has its gradient; meanwhile the operation holds
        ``ACTIVATION_GRADIENTS`` gradients the size of what it saved (the gradient coming in, the one going out, a
        contiguous copy). ``gradient_cap`` bounds the parameter gradients held (ZeRO-2 reduces them bucket by
        bucket), ``copies`` counts each of them that many times."""
        remaining = sum(self.saved)
        grads = copies * self.unsaved_grads
        peak = remaining + grads + self.output
        for saved, grad in zip(reversed(self.saved), reversed(self.grads)):
            grads += copies * grad
            held = grads if gradient_cap is None else min(grads, gradient_cap)
            peak = max(peak, remaining + held + ACTIVATION_GRADIENTS * saved)
            remaining -= saved
        return peak


def trace_backward(model: nn.Module, images: torch.Tensor, amp: Amp) -> BackwardProfile:
    """What ``model(images)`` saves for its backward, in order, and where each module's parameters are used."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    saved: list[int] = []
    grads: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in parameters:
            seen.add(storage.data_ptr())
            saved.append(storage.nbytes())
            grads.append(0)
        return tensor

    def uses_parameters(module: nn.Module, _inputs: object) -> None:
        saved.append(0)
        grads.append(sum(FP32 * p.numel() for p in module.parameters(recurse=False)))

    hooks = [m.register_forward_pre_hook(uses_parameters) for m in model.modules()
             if next(m.parameters(recurse=False), None) is not None]
    try:
        with saved_tensors_hooks(pack, lambda tensor: tensor), autocast(amp, images.device):
            output = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    unused = sum(FP32 * p.numel() for p in model.parameters()) - sum(grads)
    return BackwardProfile(tuple(saved), tuple(grads), unused, output.untyped_storage().nbytes())


@functools.lru_cache(maxsize=8)
def _small_batch_traces(backbone: str, embedding_size: int, image_size: int, amp: Amp
                        ) -> tuple[BackwardProfile, BackwardProfile]:
    model = build_backbone(backbone, embedding_size).train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        two, four = (trace_backward(model, torch.randn(n, 3, image_size, image_size), amp) for n in (2, 4))
    if len(two.saved) != len(four.saved):
        raise RuntimeError(f"{backbone}: its forward saves different tensors at 2 and 4 images")
    return two, four


def backward_profile(cfg: Config, batch: int) -> BackwardProfile:
    """``trace_backward`` of the configured backbone at ``batch`` images, traced on the CPU at 2 and 4 images
    (batch norm needs two) and extended linearly, each saved tensor on its own. fp16 is traced as bf16, its
    element size (the CPU has no fp16 autocast)."""
    amp: Amp = "bf16" if cfg.train.amp == "fp16" else cfg.train.amp
    two, four = _small_batch_traces(cfg.model.backbone, cfg.model.embedding_size, cfg.data.image_size, amp)

    def at_batch(small: int, large: int) -> int:
        return int(small + (large - small) / 2 * (batch - 2))

    saved = tuple(at_batch(a, b) for a, b in zip(two.saved, four.saved))
    return BackwardProfile(saved, two.grads, two.unsaved_grads, at_batch(two.output, four.output))


def optimizer_states(cfg: Config) -> int:
    return 0 if cfg.optim.name == "sgd" and not cfg.optim.momentum else OPTIMIZER_STATES[cfg.optim.name]


def _backbone_lines(cfg: Config, params: int, world_size: int, backward: BackwardProfile) -> list[MemoryLine]:
    states = optimizer_states(cfg)
    lines = [MemoryLine("backbone weights", FP32 * params, "held", f"{params:,} parameters x 4 B (fp32)")]
    if cfg.train.engine == "deepspeed":
        stage = cfg.deepspeed.stage
        share = math.ceil(params / world_size)
        lines += [
            MemoryLine("backbone fp32 master", FP32 * share, "held", f"1/{world_size} of the parameters x 4 B"),
            MemoryLine("backbone optimizer state", FP32 * states * share, "held",
                       f"{states} x 4 B x 1/{world_size} of the parameters ({cfg.optim.name}, ZeRO-{stage})"),
        ]
        if stage == 1:
            lines.append(MemoryLine("backbone gradients", backward.backward_peak(copies=3), "backward",
                                    "activations freed as the gradients arrive, each held three times (measured: "
                                    "DeepSpeed 0.19.8 keeps copies until the step, where ZeRO-1 reduces)"))
            step_grads = FP32 * (params + share)
        else:
            bucket = FP32 * min(cfg.deepspeed.bucket_size, params)
            lines.append(MemoryLine("backbone gradient partition and bucket", FP32 * share + bucket, "held",
                                    f"1/{world_size} of the parameters and a reduce bucket of "
                                    f"{bucket // FP32:,} x 4 B (ZeRO-2)"))
            lines.append(MemoryLine("backbone gradients", backward.backward_peak(gradient_cap=bucket), "backward",
                                    "activations freed as gradients arrive, at most a bucket of them unreduced"))
            step_grads = 0
        weight_decay_share = FP32 * share if cfg.optim.weight_decay else 0
        lines.append(MemoryLine("backbone gradients", step_grads + weight_decay_share, "step",
                                "this rank's partition and its weight-decay temporary"))
        return lines
    weight_decay_copy = FP32 * params if cfg.optim.weight_decay else 0
    if world_size > 1:
        lines.append(MemoryLine("DDP all-reduce buckets", FP32 * params, "held", "4 B a parameter"))
    lines += [
        MemoryLine("backbone optimizer state", FP32 * states * params, "held",
                   f"{states} x 4 B a parameter ({cfg.optim.name})"),
        MemoryLine("backbone activations and gradients", backward.backward_peak(), "backward",
                   "activations freed as the 4 B gradients arrive, operation by operation"),
        MemoryLine("backbone gradients", FP32 * params + weight_decay_copy, "step",
                   "4 B a parameter, and as many for the weight-decay temporary" if weight_decay_copy
                   else "4 B a parameter"),
    ]
    return lines


def _head_lines(cfg: Config, num_classes: int, world_size: int, on_gpu: bool) -> list[MemoryLine]:
    start, end = class_range(num_classes, 0, world_size)
    k, dim = cfg.head.sub_centers, cfg.model.embedding_size
    rows = (end - start) * k  # centres, K a class
    scored = rows if cfg.head.sample_rate >= 1.0 else min(rows, math.ceil((end - start) * cfg.head.sample_rate) * k)
    gathered = cfg.data.batch_size * world_size
    shard = FP32 * rows * dim
    lines = [
        MemoryLine("head weights", shard, "held", f"{rows:,} centres x {dim} x 4 B"),
        MemoryLine("head optimizer state", optimizer_states(cfg) * shard, "held",
                   f"{optimizer_states(cfg)} x the shard ({cfg.optim.name})"),
    ]
    impl = cfg.head.impl
    if cfg.head.type == "sface" and impl == "auto":
        impl = "triton" if on_gpu and k == 1 else "chunked"
    autograd_block = cfg.head.type != "sface" or impl == "dense"
    # the fused and chunked blocks make the shard's gradient in the forward pass, unless they score sampled rows,
    # whose gradient (below) reaches the shard's in the backward pass
    in_forward = not autograd_block and scored == rows
    for phase in ("forward", "backward", "step") if in_forward else ("backward", "step"):
        lines.append(MemoryLine("head gradient", shard, phase, f"{rows:,} centres x {dim} x 4 B"))
    lines.append(MemoryLine("gathered embeddings", 4 * FP32 * gathered * dim, "forward",
                            f"{gathered:,} rows x {dim} x 4 B: gathered, normalised and their two gradients"))
    if scored < rows:
        copies, what = (1, "") if autograd_block else (2, ", and their gradient")
        lines.append(MemoryLine("sampled weight rows", copies * FP32 * scored * dim, "forward",
                                f"{scored:,} scored rows x {dim} x 4 B{what}"))
    if autograd_block:
        logits = MARGIN_LOGIT_COPIES * FP32 * gathered * scored + FP32 * scored * dim
        normalised = NORMALISED_ROW_COPIES * FP32 * scored * dim
        lines.append(MemoryLine("logits or normalised rows", max(logits, normalised), "forward",
                                f"the larger of {MARGIN_LOGIT_COPIES} x [{gathered:,} x {scored:,}] logits with the "
                                f"normalised rows, and the {NORMALISED_ROW_COPIES} x [{scored:,} x {dim}] of their "
                                f"backward, x 4 B"))
    elif impl == "chunked":
        classes_per_chunk = cfg.head.chunk_size or auto_chunk_size(gathered, scored // k, dim, k)
        chunk = min(classes_per_chunk * k, scored)
        lines.append(MemoryLine("one chunk's temporaries", chunk_temporary_bytes(gathered, chunk, dim), "forward",
                                f"4 x [{gathered:,} x {chunk:,}] and 4 x [{chunk:,} x {dim}] x 4 B "
                                f"(head.impl chunked)"))
    return lines


def plan_memory(cfg: Config, num_classes: int, world_size: int, on_gpu: bool = True) -> MemoryPlan:
    """What one rank of ``world_size`` holds in a training step of ``cfg``, part by part and phase by phase;
    ``on_gpu``: ``head.impl: auto`` runs the fused block (else the chunked one)."""
    with torch.device("meta"):
        params = sum(p.numel() for p in build_backbone(cfg.model.backbone, cfg.model.embedding_size).parameters())
    batch, size = cfg.data.batch_size, cfg.data.image_size
    backward = backward_profile(cfg, batch)
    lines = _backbone_lines(cfg, params, world_size, backward)
    lines.append(MemoryLine("input images", FP32 * batch * 3 * size * size, "held",
                            f"{batch} x 3 x {size} x {size} x 4 B"))
    lines.append(MemoryLine("backbone activations", backward.end_of_forward(), "forward",
                            f"saved for the backward at {batch} images ({cfg.train.amp} autocast)"))
    lines += _head_lines(cfg, num_classes, world_size, on_gpu)
    engine = "DDP" if cfg.train.engine == "ddp" else f"ZeRO-{cfg.deepspeed.stage}"
    return MemoryPlan(world_size, engine, tuple(lines))


class AllocationTrace:
    """Records every CPU allocation and free inside its ``with`` block; ``peak`` is then the most bytes allocated
    inside it that were alive at once. Frees of memory allocated before the block (an earlier object collected
    meanwhile) are not counted: they would hide what the block allocates."""

    def __init__(self) -> None:
        self.peak = 0
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> AllocationTrace:
        gc.collect()
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(*exc)
        events = []
        pending = list(self._profile.profiler.kineto_results.experimental_event_tree())
        while pending:
            node = pending.pop()
            pending.extend(node.children)
            if node.tag == torch._C._profiler._EventType.Allocation:
                fields = node.extra_fields
                events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        self.peak = peak_live_bytes(events)


def peak_live_bytes(events: list[tuple[int, int, int]]) -> int:
    """The most bytes alive at once in ``events`` (time, pointer, size: positive an allocation, negative a free).

    The profiler records the thread that runs the step only: a tensor whose last reference drops on another
    thread (a gloo work letting go of a buffer it has reduced) is freed unrecorded, which shows as an allocation
    at an address still alive. Such an earlier allocation is counted when it is made and not after (it is a
    communication buffer, alive for one collective); counted until its address is reused, a backbone-sized ZeRO
    buffer added its size to the peak in some runs and not others. At one time a free comes before an
    allocation, and frees of memory allocated before the trace are skipped.
    """
    ordered = sorted(events, key=lambda event: (event[0], event[2] > 0))
    allocated_at: dict[int, int] = {}
    free_unrecorded: set[int] = set()
    for index, (_, pointer, size) in enumerate(ordered):
        if size > 0:
            if pointer in allocated_at:
                free_unrecorded.add(allocated_at[pointer])
            allocated_at[pointer] = index
        else:
            allocated_at.pop(pointer, None)
    alive: dict[int, int] = {}
    live = peak = 0
    for index, (_, pointer, size) in enumerate(ordered):
        if size > 0:
            peak = max(peak, live + size)
            if index not in free_unrecorded:
                alive[pointer] = size
                live += size
        elif pointer in alive:
            live -= alive.pop(pointer)
    return peak


OTHER_THREADS_REPEATS = 3
"""CPU measurements on several ranks keep the least of this many: the trace misses frees made on another thread
(a gloo work dropping the last reference to a buffer it reduced), so it can only over-count, and whether it does
depends on which thread lets go first."""


def measure_step_peak(cfg: Config, env: DistEnv, steps: int = 2) -> int:
    """The most bytes allocated at once on this rank while a ``Trainer`` of ``cfg`` (on synthetic faces, so that
    no dataset is needed) is built and trains ``steps`` steps of random images: the reference the plan is
    checked against. On a GPU, CUDA's peak of allocated bytes over those held before; on the CPU,
    ``AllocationTrace`` (the least of ``OTHER_THREADS_REPEATS`` on several ranks). Collective where the trainer
    is."""
    data = dataclasses.replace(cfg.data, backend="synthetic", synthetic_images_per_class=1, num_workers=0)
    cfg = dataclasses.replace(cfg, data=data, eval=dataclasses.replace(cfg.eval, bins=[]))
    generator = torch.Generator().manual_seed(env.rank)
    size, batch = cfg.data.image_size, cfg.data.batch_size

    def micro_batch() -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(batch, 3, size, size, generator=generator)
        labels = torch.randint(0, cfg.data.num_classes, (batch,), generator=generator)
        return images.to(env.device), labels.to(env.device)

    def train() -> None:
        trainer = Trainer(cfg, env)
        try:
            for _ in range(steps):
                trainer.train_step([micro_batch() for _ in range(cfg.train.grad_accum)])
        finally:
            trainer.close()

    if env.device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(env.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        train()
        torch.cuda.synchronize(env.device)
        return torch.cuda.max_memory_allocated(env.device) - before
    peaks = []
    for _ in range(OTHER_THREADS_REPEATS if env.world_size > 1 else 1):
        with AllocationTrace() as trace:
            train()
        peaks.append(trace.peak)
    return min(peaks)
