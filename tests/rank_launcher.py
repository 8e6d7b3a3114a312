"""Run a function on N real gloo ranks (spawned processes) and collect what each returns."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(
    rank: int, worker: Callable[..., Any], world_size: int, tmp: str, env: dict[str, str], args: tuple[Any, ...]
) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(
    worker: Callable[..., Any], world_size: int, *args: Any, env: dict[str, str] | None = None
) -> list[Any]:
    """Spawn ``world_size`` ranks running ``worker(rank, world_size, *args)``; return results in rank order.

    ``env`` is set in each rank before the worker runs (and so before it imports Triton, say), not in this process.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(worker, world_size, tmp, env or {}, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world_size)]
