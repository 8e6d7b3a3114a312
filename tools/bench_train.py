"""Samples/s of one whole training step, this project's against a peer-structured loop and the backbone alone.

    python tools/bench_train.py                                   # CUDA: iresnet50/100, batch 128, MS1M head
    python tools/bench_train.py --device cpu --backbones tiny --batch 64 --classes 10000

Rows, per backbone, on synthetic device tensors (data loading excluded):

* ``project``: ``Trainer.train_step``, one call a step, of a ``Trainer`` built from a synthetic-backend
  config (the backbone ``build_backbone`` makes, ``data_parallel``, the SFace head ``build_head`` makes
  with ``head.impl``, ``ShardOptimizer``, the GradScaler path, gradient clipping, ``train.amp`` autocast);
* ``peer``: a loop with insightface arcface_torch's structure (``train_v2.py``): DDP (16 MiB buckets,
  static graph) with the fp16-compression communication hook, fp16 autocast, a dense ArcFace head
  over the whole shard (logits [B, C] materialised) with cross-entropy, a GradScaler,
  ``clip_grad_norm_(5)``, one SGD over backbone and head, ``loss.item()`` every step;
* ``backbone``: the backbone alone (forward, backward, SGD; no head), under the project's autocast.

Each row warms up, then times ``--repeat`` windows of ``--steps`` steps, the device synchronised
at both ends of a window, the rows' windows interleaved; samples/s is the median window's. Peak
memory (CUDA) is ``max_memory_allocated`` over the row's build and warm-up, less what the rows
built before it hold: its weights, optimizer state, activations and inputs.
The process runs as a single-rank process group (FileStore), so the peer's DDP hook runs; the
project's ``data_parallel`` is the identity on one rank, as in a one-GPU run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

from sface_dist.backbones import build_backbone
from sface_dist.config import Config, DataConfig, HeadConfig, ModelConfig, TrainConfig
from sface_dist.parallel.launch import DistEnv
from sface_dist.training.trainer import Trainer

MS1M_CLASSES = 85742
MIB = 2**20
LR = 0.01
"""Every row's learning rate: small enough that random inputs keep the loss finite."""
VARIANTS = ("project", "peer", "backbone")
TARGETS = (
    "GPU targets (training-loop issue): project >= 1.5x peer, project >= 0.9x backbone alone; reference on one "
    "H200, r50, batch 128, MS1M head: insightface's own code 1,985 img/s, backbone alone 3,204 img/s (eager)"
)

Step = Callable[[], None]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[None]:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def synthetic_batch(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.batch, 3, 112, 112, device=device, generator=generator)
    labels = torch.randint(0, args.classes, (args.batch,), device=device, generator=generator)
    return images, labels


@contextlib.contextmanager
def project_step(backbone: str, args: argparse.Namespace, env: DistEnv) -> Iterator[Step]:
    """``Trainer.train_step`` on a fixed batch: the only Trainer call a step makes."""
    with tempfile.TemporaryDirectory() as output:
        cfg = Config(
            data=DataConfig(backend="synthetic", num_classes=args.classes, batch_size=args.batch, num_workers=0),
            model=ModelConfig(backbone=backbone, channels_last=args.channels_last),
            head=HeadConfig(impl=args.impl, precision=args.head_precision),
            train=TrainConfig(output=str(Path(output) / "run"), amp=args.amp, steps=1),
        )
        trainer = Trainer(cfg, env)
        try:
            images, labels = synthetic_batch(args, env.device)
            yield lambda: trainer.train_step([(images, labels)])
        finally:
            trainer.close()


class PeerArcFace(nn.Module):
    """ArcFace over the whole shard as arcface_torch's PartialFC_V2 (sample rate 1) and its ArcFace margin compute
    it on one rank: normalised fp16 matmul, logits [B, C] in fp32, margin on the target rows ``torch.where`` finds
    (a host sync, as there), then ``F.cross_entropy`` (the peer's DistCrossEntropy on one rank, fused)."""

    def __init__(self, classes: int, dim: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.normal(0, 0.01, (classes, dim)))
        self.s, self.cos_m, self.sin_m = s, math.cos(m), math.sin(m)
        self.theta, self.sinmm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def forward(self, embeddings: Tensor, labels: Tensor, amp: str) -> Tensor:
        with autocast(embeddings.device, amp):
            logits = F.linear(F.normalize(embeddings), F.normalize(self.weight))
        logits = logits.float().clamp(-1, 1)
        rows = torch.where(labels != -1)[0]
        target = logits[rows, labels[rows]]
        sin_theta = torch.sqrt(1.0 - target.pow(2))
        margined = torch.where(
            target > self.theta, target * self.cos_m - sin_theta * self.sin_m, target - self.sinmm
        )
        logits[rows, labels[rows]] = margined
        return F.cross_entropy(logits * self.s, labels)


@contextlib.contextmanager
def peer_step(backbone_name: str, args: argparse.Namespace, env: DistEnv) -> Iterator[Step]:
    """One step of arcface_torch's loop (train_v2.py, gradient accumulation 1) on a fixed batch."""
    device = env.device
    backbone = build_backbone(backbone_name).to(device)
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", "You passed find_unused_parameters=true", UserWarning)
    model = nn.parallel.DistributedDataParallel(
        backbone, broadcast_buffers=False, device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=16, find_unused_parameters=True, static_graph=True,
    )
    model.register_comm_hook(None, fp16_compress_hook)
    head = PeerArcFace(args.classes, 512).to(device)
    optimizer = torch.optim.SGD(
        [{"params": backbone.parameters()}, {"params": head.parameters()}], lr=LR, momentum=0.9, weight_decay=5e-4
    )
    scaler = torch.amp.GradScaler(device.type, growth_interval=100, enabled=args.peer_amp == "fp16")
    images, labels = synthetic_batch(args, device)

    def step() -> None:
        with autocast(device, args.peer_amp):
            embeddings = model(images)
        loss = head(embeddings.float(), labels, args.peer_amp)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(backbone.parameters(), 5)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        loss.item()

    yield step


@contextlib.contextmanager
def backbone_step(backbone_name: str, args: argparse.Namespace, env: DistEnv) -> Iterator[Step]:
    """Forward, backward and SGD of the backbone alone, under the project's autocast and memory format."""
    device = env.device
    backbone = build_backbone(backbone_name).to(device)
    images, _ = synthetic_batch(args, device)
    if args.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(backbone.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        with autocast(device, args.amp):
            embeddings = backbone(images)
        embeddings.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    yield step


STEPS = {"project": project_step, "peer": peer_step, "backbone": backbone_step}


def time_window(step: Step, args: argparse.Namespace, device: torch.device) -> float:
    """Samples/s of ``args.steps`` steps, the device synchronised at both ends."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return args.steps * args.batch / (time.perf_counter() - start)


def measure(backbone: str, args: argparse.Namespace, env: DistEnv) -> dict[str, dict[str, float]]:
    """Per variant: samples/s (median window) and peak device MiB over its build and warm-up.

    All variants stay built and their windows interleave, so a change of load on a shared
    machine slows every row alike instead of one.
    """
    device = env.device
    cuda = device.type == "cuda"
    steps: dict[str, Step] = {}
    peaks: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for variant in VARIANTS:
            synchronize(device)
            held = torch.cuda.memory_allocated(device) if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            steps[variant] = stack.enter_context(STEPS[variant](backbone, args, env))
            for _ in range(args.warmup):
                steps[variant]()
            synchronize(device)
            peaks[variant] = (torch.cuda.max_memory_allocated(device) - held) / MIB if cuda else math.nan
        rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeat):
            for variant in VARIANTS:
                rates[variant].append(time_window(steps[variant], args, device))
    return {name: {"samples_per_s": statistics.median(rates[name]), "peak_mib": peaks[name]} for name in VARIANTS}


def init_single_rank(device: torch.device, store_dir: str) -> DistEnv:
    """A one-rank process group (NCCL on CUDA, gloo on CPU) over a FileStore, so that DDP can wrap."""
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    store = dist.FileStore(os.path.join(store_dir, "store"), 1)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=0, world_size=1, device_id=device if device.type == "cuda" else None
    )
    return DistEnv(rank=0, world_size=1, local_rank=0, device=device)


def header(args: argparse.Namespace, device: torch.device) -> str:
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    versions = f"torch {torch.__version__}"
    with contextlib.suppress(ImportError):
        versions += f", triton {__import__('triton').__version__}"
    return (
        f"# training step, batch {args.batch}, {args.classes} classes, world size 1, {device.type}: {machine}; "
        f"{versions}\n# project: train.amp {args.amp}, head.impl {args.impl}, head.precision {args.head_precision}, "
        f"channels_last {args.channels_last}; peer: amp {args.peer_amp}; cudnn.benchmark {args.cudnn_benchmark}; "
        f"warmup {args.warmup}, median of {args.repeat} windows of {args.steps} steps\n# {TARGETS}"
    )


def benchmark(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    with tempfile.TemporaryDirectory() as store_dir:
        env = init_single_rank(device, store_dir)
        try:
            print(header(args, env.device), flush=True)
            print(f"{'backbone':>12} {'variant':>9} {'samples/s':>10} {'x peer':>7} {'x backbone':>10} {'peak MiB':>9}")
            for backbone in args.backbones.split(","):
                results = measure(backbone, args, env)
                peer, alone = results["peer"]["samples_per_s"], results["backbone"]["samples_per_s"]
                for variant, result in results.items():
                    rate, peak = result["samples_per_s"], result["peak_mib"]
                    peak_text = "-" if math.isnan(peak) else f"{peak:.0f}"
                    print(f"{backbone:>12} {variant:>9} {rate:>10.1f} {rate / peer:>7.2f} {rate / alone:>10.2f} "
                          f"{peak_text:>9}", flush=True)
        finally:
            dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--backbones", default=None, help="comma-separated (default iresnet50,iresnet100; CPU tiny)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 128; CPU 32)")
    parser.add_argument("--classes", type=int, default=None, help=f"head classes (default {MS1M_CLASSES}; CPU 2000)")
    parser.add_argument("--impl", default="auto", help="project's head.impl")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), help="train.amp (default bf16; CPU none)")
    parser.add_argument("--head-precision", default=None, help="project's head.precision (default bf16; CPU fp32)")
    parser.add_argument("--peer-amp", choices=("none", "fp16"), help="the peer's autocast (default fp16; CPU none)")
    parser.add_argument("--channels-last", action="store_true", help="project and backbone rows in channels-last")
    parser.add_argument(
        "--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
        help="torch.backends.cudnn.benchmark for every row (the peer's train_v2.py sets it)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 10; CPU 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed window (default 20; CPU 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed windows per row (median kept)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    args.backbones = args.backbones or ("iresnet50,iresnet100" if cuda else "tiny")
    args.batch = args.batch or (128 if cuda else 32)
    args.classes = args.classes or (MS1M_CLASSES if cuda else 2000)
    args.amp = args.amp or ("bf16" if cuda else "none")
    args.head_precision = args.head_precision or ("bf16" if cuda else "fp32")
    args.peer_amp = args.peer_amp or ("fp16" if cuda else "none")
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.steps = args.steps or (20 if cuda else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
