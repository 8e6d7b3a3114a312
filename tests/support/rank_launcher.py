"""Run a function on N real gloo ranks (separate processes) and collect what each returns.

Ranks are forked from a fork server that imported torch (and ``torch._dynamo``, which the first optimizer
imports) once for the whole test session, so a run costs well under a second instead of a fresh interpreter
per rank. A run that sets environment variables spawns fresh interpreters, so that they are set before
anything is imported.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sface_dist.parallel.launch import exit_now

multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "sface_dist.training.trainer"])


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
    exit_now(0)


def run_ranks(
    worker: Callable[..., Any], world_size: int, *args: Any, env: dict[str, str] | None = None
) -> list[Any]:
    """Run ``world_size`` ranks of ``worker(rank, world_size, *args)``; return results in rank order.

    ``env`` is set in each rank before the worker runs (and so before it imports Triton, say), not in this process.
    """
    start_method = "spawn" if env else "forkserver"
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _entry, args=(worker, world_size, tmp, env or {}, args), nprocs=world_size, join=True,
            start_method=start_method,
        )
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world_size)]
