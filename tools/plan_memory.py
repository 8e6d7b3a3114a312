"""Will a configuration fit? Per-rank memory of a training step, part by part, before anything is launched.

    python tools/plan_memory.py configs/ms1m.yaml --world-size 8
    python tools/plan_memory.py configs/wf42m.yaml --world-size 8 --engines ddp,zero1,zero2 --gpu-gib 80
    torchrun --nproc_per_node=2 tools/plan_memory.py configs/demo.yaml --measure   # plan against a measured peak

For each engine (DDP, DeepSpeed ZeRO-1 or ZeRO-2) the plan lists what one rank holds through the step (fp32
backbone weights, optimizer state, DDP's buckets or ZeRO's partitions, the head's class shard and its state) and
what each phase of the step adds (the activations the backbone saves, traced on the CPU at 2 and 4 images and
extended to the batch; the head's working set; the gradients arriving in the backward pass; the optimizer
step's temporaries), and the peak: the held bytes plus the largest phase (``sface_dist/training/memory_plan.py``).
Not counted: the CUDA context, NCCL's buffers and the allocator's fragmentation, which ``--reserve-gib`` stands for
in the verdict. ``--measure`` builds the real trainer on synthetic faces, trains two steps on this machine's CPU and
prints the measured peak beside the plan (``head.impl: auto`` is planned as the CPU runs it, chunked).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from sface_dist.cli import run_cli
from sface_dist.config import Config, load_config
from sface_dist.data.dataset_checks import read_property
from sface_dist.parallel.launch import destroy_distributed, exit_now, init_distributed
from sface_dist.training.memory_plan import PHASES, MemoryPlan, measure_step_peak, plan_memory

GIB = 2**30
MIB = 2**20
MAX_BATCH = 8192
"""The largest batch a rank the verdict looks for."""
ENGINES = {"ddp": ("ddp", 1), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2)}


def with_engine(cfg: Config, engine: str) -> Config:
    name, stage = ENGINES[engine]
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, engine=name),
                               deepspeed=dataclasses.replace(cfg.deepspeed, stage=stage))


def describe(cfg: Config, plan: MemoryPlan) -> list[str]:
    lines = [f"# {plan.engine}, {plan.world_size} rank(s): {cfg.model.backbone}, {cfg.data.num_classes:,} classes, "
             f"batch {cfg.data.batch_size} a rank, train.amp {cfg.train.amp}, head {cfg.head.type} "
             f"(impl {cfg.head.impl}, sample rate {cfg.head.sample_rate}), optim {cfg.optim.name}",
             f"{'part':40} {'phase':9} {'MiB':>10}  how"]
    for line in plan.lines:
        lines.append(f"{line.part:40} {line.phase:9} {line.bytes / MIB:10.1f}  {line.how}")
    for phase, words in PHASES.items():
        lines.append(f"{'= ' + words:50} {plan.phase_bytes(phase) / MIB:10.1f}")
    lines.append(f"peak: {plan.peak / GIB:.2f} GiB a rank ({PHASES[plan.peak_phase]})")
    return lines


def largest_batch(cfg: Config, world_size: int, budget: float) -> int:
    """The largest ``data.batch_size`` whose planned peak stays within ``budget`` bytes (0: not even one image).
    The peak grows with the batch, so a doubling and then a bisection find it."""
    def fits(batch: int) -> bool:
        batched = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))
        return plan_memory(batched, cfg.data.num_classes, world_size).peak <= budget

    if not fits(2):
        return 0
    low, high = 2, 4
    while fits(high) and high < MAX_BATCH:
        low, high = high, 2 * high
    if high >= MAX_BATCH and fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def verdict(cfg: Config, plan: MemoryPlan, gpu_gib: float, reserve_gib: float) -> str:
    budget = (gpu_gib - reserve_gib) * GIB
    room = (budget - plan.peak) / GIB
    largest = largest_batch(cfg, plan.world_size, budget)
    most = f"data.batch_size up to {largest:,}" if largest < MAX_BATCH else f"data.batch_size {MAX_BATCH:,} and more"
    if room >= 0:
        return (f"fits a {gpu_gib:g} GiB GPU with {room:.1f} GiB to spare (after {reserve_gib:g} GiB reserved); "
                f"{most} would fit")
    return (f"does not fit a {gpu_gib:g} GiB GPU: {-room:.1f} GiB over (after {reserve_gib:g} GiB reserved); "
            f"{most} would fit, or shard further (more ranks, train.engine deepspeed)")


def class_count(cfg: Config, config: str) -> int:
    """``data.num_classes`` where the config leaves it to the dataset: its ``property`` file."""
    found = Path(cfg.data.root) / "property"
    if cfg.data.backend != "synthetic" and cfg.data.root and found.is_file():
        return read_property(found)[0]
    raise ValueError(f"{config}: data.num_classes: 0 and no {found} to read it from: set the class count "
                     f"(--set data.num_classes=N) to plan the head's shard")


def plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if cfg.data.num_classes <= 0:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_classes=class_count(cfg, args.config)))
    if args.measure:
        return measure(cfg)
    for engine in args.engines.split(","):
        engine_cfg = with_engine(cfg, engine)
        result = plan_memory(engine_cfg, cfg.data.num_classes, args.world_size, on_gpu=True)
        fit = verdict(engine_cfg, result, args.gpu_gib, args.reserve_gib)
        print("\n".join([*describe(engine_cfg, result), fit, ""]))
    return 0


def measure(cfg: Config) -> int:
    env = init_distributed(cfg.train.collective_timeout_minutes)
    try:
        peak = measure_step_peak(cfg, env)
    finally:
        destroy_distributed()
    result = plan_memory(cfg, cfg.data.num_classes, env.world_size, on_gpu=env.device.type == "cuda")
    if env.is_main:
        where = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "this CPU"
        print("\n".join(describe(cfg, result)))
        print(f"measured on {where}, rank 0, two steps: {peak / MIB:.1f} MiB; plan {result.peak / MIB:.1f} MiB "
              f"({result.peak / peak:.3f} x)")
    return 0


def engine_list(text: str) -> str:
    unknown = [name for name in text.split(",") if name not in ENGINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine {unknown[0]!r}; choose from {', '.join(ENGINES)}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--world-size", type=int, default=8, help="ranks to plan for (default: %(default)s)")
    parser.add_argument("--engines", type=engine_list, default="ddp",
                        help=f"comma-separated, of {', '.join(ENGINES)} (default: %(default)s)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory (default: %(default)s)")
    parser.add_argument("--reserve-gib", type=float, default=2.0,
                        help="left for the CUDA context, NCCL and fragmentation (default: %(default)s)")
    parser.add_argument("--measure", action="store_true",
                        help="train two steps on this CPU (under torchrun: at its world size) and print the "
                             "measured peak beside the plan")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error("--world-size must be at least 1")
    return run_cli(lambda: plan(args))


if __name__ == "__main__":
    exit_now(main())
