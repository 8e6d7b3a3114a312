"""Backbone optimizer state per rank under DDP, ZeRO-1 and ZeRO-2 (``train.engine``), side by side.

Computed from the partitioning for ``--world`` ranks: the optimizer's state (SGD momentum: 4 bytes a parameter;
AdamW's two moments: 8), DeepSpeed's fp32 master copy of the rank's partition (4 bytes a parameter over the
ranks; with DeepSpeed's bf16 weights, which this project does not run (its DeepSpeed weights stay fp32), it is
the only fp32 copy: those rows are for comparison), and the most gradient
bytes a rank holds during the backward pass (ZeRO-1 reduces at the accumulation boundary, so the whole gradient
is there before it; ZeRO-2 reduces bucket by bucket and keeps its partition). Then measured on
``--measure-world`` gloo ranks on this machine: the bytes in the torch optimizer's state and DeepSpeed's
partitions after one step, and the gradients left once the backward pass (and DeepSpeed's reduction) is over.
The step's gradients come from a loss that touches every parameter (``0 · Σ p``): no forward pass is needed.

    python tools/bench_zero_state.py --backbone iresnet100 --world 8 --measure-world 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sface_dist.backbones import build_backbone
from sface_dist.config import DeepSpeedConfig, OptimConfig
from sface_dist.parallel.launch import DistEnv, exit_now
from sface_dist.training.optimization import build_backbone_optimizer

MIB = 2**20
ENGINES = ("DDP", "ZeRO-1", "ZeRO-2")
STATE_BYTES = {"sgd": 4, "adamw": 8}
"""Optimizer-state bytes per parameter: SGD's fp32 momentum, AdamW's two fp32 moments."""


@dataclass(frozen=True)
class Row:
    engine: str
    optimizer: str
    weights: str
    state: float
    master: float
    gradients: float

    @property
    def total(self) -> float:
        return self.state + self.master + self.gradients


def computed(params: int, world: int, optimizer: str, weights: str) -> list[Row]:
    """Bytes per rank from the partitioning; ``weights`` is the dtype of the model's own copy."""
    grad_bytes = 4 if weights == "fp32" else 2
    state = STATE_BYTES[optimizer] * params
    rows = [Row("DDP", optimizer, weights, state, 0.0, grad_bytes * params)] if weights == "fp32" else []
    for stage in (1, 2):
        gradients = grad_bytes * params / world if stage == 2 else grad_bytes * params
        rows.append(Row(f"ZeRO-{stage}", optimizer, weights, state / world, 4 * params / world, gradients))
    return rows


def _measure_rank(rank: int, world: int, backbone_name: str, tmp: str, results: dict[str, Row]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    from sface_dist.training.engine import DeepSpeedEngine

    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    for optimizer_name in STATE_BYTES:
        for engine in ENGINES:
            torch.manual_seed(0)
            backbone = build_backbone(backbone_name, 512)
            optimizer = build_backbone_optimizer(backbone, OptimConfig(name=optimizer_name), 0.1)
            loss = sum((p * 0).sum() for p in backbone.parameters())
            if engine == "DDP":
                loss.backward()  # DDP's reduction keeps the full gradient: it needs no process group here
                gradients = sum(p.grad.nbytes for p in backbone.parameters() if p.grad is not None)
                optimizer.step()
                master = 0
            else:
                stage = int(engine[-1])
                ds = DeepSpeedEngine(backbone, optimizer, DeepSpeedConfig(stage=stage), env, 1, 1, 0.0)
                ds.accumulate(last=True)
                ds.backward(loss)
                gradients = sum(p.grad.nbytes for p in backbone.parameters() if p.grad is not None)
                gradients += sum(g.nbytes for group in ds.zero.averaged_gradients.values() for g in group or [])
                ds.step()
                master = sum(p.nbytes for p in ds.zero.single_partition_of_fp32_groups)
            state = sum(t.nbytes for s in optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t) and t.dim() > 0)
            if rank == 0:
                results[f"{engine} {optimizer_name}"] = Row(engine, optimizer_name, "fp32", state, master, gradients)
            dist.barrier()
    dist.destroy_process_group()
    exit_now(0)


def measure(backbone: str, world: int) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_measure_rank, args=(world, backbone, tmp, results), nprocs=world, start_method="spawn")
        return [results[f"{engine} {name}"] for name in STATE_BYTES for engine in ENGINES]


def table(title: str, rows: list[Row]) -> str:
    lines = [f"# {title}", f"{'engine':8} {'optimizer':9} {'weights':7} {'state':>10} {'fp32 master':>12} "
             f"{'gradients':>10} {'total':>10} {'vs DDP':>7}"]
    ddp = {row.optimizer: row.total for row in rows if row.engine == "DDP"}
    for row in rows:
        ratio = f"{row.total / ddp[row.optimizer]:.2f}x" if row.optimizer in ddp else ""
        lines.append(f"{row.engine:8} {row.optimizer:9} {row.weights:7} {row.state / MIB:9.1f}M "
                     f"{row.master / MIB:11.1f}M {row.gradients / MIB:9.1f}M {row.total / MIB:9.1f}M {ratio:>7}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="iresnet100")
    parser.add_argument("--world", type=int, default=8, help="ranks of the computed table")
    parser.add_argument("--measure-world", type=int, default=2, help="gloo ranks measured here (0: none)")
    args = parser.parse_args()
    with torch.device("meta"):
        params = sum(p.numel() for p in build_backbone(args.backbone, 512).parameters())
    print(f"# {args.backbone}: {params:,} parameters; MiB per rank")
    for world in sorted({args.world, args.measure_world} - {0}):
        rows = [row for name in STATE_BYTES for weights in ("fp32", "bf16") for row in computed(params, world, name,
                                                                                                 weights)]
        print(table(f"computed, {world} ranks", rows))
    if args.measure_world:
        print(table(f"measured, {args.measure_world} gloo ranks, after one step", measure(args.backbone,
                                                                                           args.measure_world)))


if __name__ == "__main__":
    main()
