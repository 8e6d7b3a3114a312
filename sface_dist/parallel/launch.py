"""Process-group setup: ``init_distributed`` reads the torchrun (or SLURM) environment and picks NCCL on CUDA,
gloo on CPU; without that environment it runs as a single process."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from sface_dist.parallel.agreement import PeerError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class LaunchError(RuntimeError):
    """The processes were started in a way this node cannot serve (missing rendezvous, too few GPUs)."""


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init_distributed(timeout_minutes: float = 30) -> DistEnv:
    """Initialise the default process group from torchrun or SLURM variables.

    A collective that waits longer than ``timeout_minutes`` for a peer fails (gloo raises on the waiting rank,
    NCCL's watchdog aborts the process).

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under
    ``srun`` the SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID variables are used and
    MASTER_ADDR/MASTER_PORT must be exported by the batch script.
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible on this node "
                "(launch at most one process per GPU, e.g. torchrun --nproc_per_node=gpu)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise LaunchError(f"{name} is not set: launch with torchrun, or export it in the SLURM script")
        if _env_int("TORCHELASTIC_MAX_RESTARTS", default=0) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == (
                "True"):
            if rank != 0:
                raise PeerError("rank 0 names the launch setting")
            raise LaunchError(
                "torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment: "
                "without it a restart reuses the first round's store and can fail to connect its ranks "
                "(docs/multinode.md, Restarts after a failure; docker/entrypoint.sh and scripts/slurm set it)"
            )
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
            device_id=device if backend == "nccl" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_now(status: int) -> NoReturn:
    """End the process with ``status`` once its work is over: results written and closed, process group destroyed
    (or left broken on purpose), so the interpreter's teardown has nothing left to do but collect C++ objects, where
    a thread of a torn-down gloo group can still abort the process (``terminate called without an active
    exception``, seen after torchrun restarts and in spawned test ranks) and turn finished work into a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
