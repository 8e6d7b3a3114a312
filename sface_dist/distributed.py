"""Process-group setup and the autograd-aware collectives of the sharded head.

``init_distributed`` reads the torchrun (or SLURM) environment and picks NCCL on
CUDA, gloo on CPU; without that environment it runs as a single process.

The head's data flow is two collectives with autograd rules:

* ``gather_embeddings``: all-gather of ragged per-rank batches; its backward is a
  reduce-scatter (sum) of the gradient, because every rank scores every row
  against its own classes;
* ``reduce_from_shards``: all-reduce (sum) of per-shard loss partials; its
  backward is the identity, because each shard's partial depends only on that
  shard's classes.
"""


import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from sface_dist.config import GradComm, check_choice

# torch >= 2.13 renames the fixed-size collectives; older releases only have the *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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


class PeerError(RuntimeError):
    """Another rank stopped with an error and reported it; this rank stops too, silently."""


class CollectiveError(RuntimeError):
    """A collective that never completed on this rank: a peer hung past the timeout, or died."""


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


def group_rank(group: ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def group_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def even_split(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` share of ``count`` items (classes, images) for ``rank``.

    Shares are in rank order and differ in size by at most one, the larger ones first.
    """
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def even_split_sizes(count: int, world_size: int) -> list[int]:
    """The size of every rank's ``even_split`` share, in rank order (the row counts for ``gather_rows``)."""
    return [stop - start for start, stop in (even_split(count, rank, world_size) for rank in range(world_size))]


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous ``[start, end)`` slice of the head's classes owned by ``rank`` (an ``even_split``)."""
    return even_split(num_classes, rank, world_size)


def gather_sizes(count: int, device: torch.device, group: ProcessGroup | None) -> list[int]:
    """Every rank's row count (one small all-gather)."""
    world = group_size(group)
    if world == 1:
        return [count]
    local = torch.tensor([count], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather_single(sizes, local, group=group)
    return sizes.tolist()


def _padded(tensor: Tensor, rows: int) -> Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])


def _all_gather_ragged(tensor: Tensor, sizes: list[int], group: ProcessGroup | None) -> Tensor:
    """Concatenate every rank's ``tensor`` (first dims ``sizes``) in rank order.

    Pads to the largest size so that the fixed-size all-gather works on every
    backend, then drops the padding.
    """
    rows = max(sizes)
    out = tensor.new_empty((len(sizes) * rows, *tensor.shape[1:]))
    _all_gather_single(out, _padded(tensor, rows), group=group)
    return torch.cat([out[r * rows : r * rows + n] for r, n in enumerate(sizes)])


class _GatherEmbeddings(torch.autograd.Function):
    """All-gather forward, reduce-scatter (sum) backward."""

    @staticmethod
    def forward(ctx, local: Tensor, sizes: list[int], group: ProcessGroup | None) -> Tensor:
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_ragged(local, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        sizes, group = ctx.sizes, ctx.group
        rows = max(sizes)
        chunks = torch.split(grad.contiguous(), sizes)
        padded = torch.cat([_padded(chunk, rows) for chunk in chunks])
        local = grad.new_empty((rows, *grad.shape[1:]))
        _reduce_scatter_single(local, padded, op=dist.ReduceOp.SUM, group=group)
        return local[: sizes[group_rank(group)]], None, None


def gather_embeddings(
    local: Tensor, group: ProcessGroup | None, sizes: list[int] | None = None
) -> tuple[Tensor, list[int]]:
    """All-gather ragged row blocks from every rank; differentiable (backward = reduce-scatter).

    Returns the gathered tensor and the per-rank row counts.
    """
    if group_size(group) == 1:
        return local, [local.shape[0]]
    if sizes is None:
        sizes = gather_sizes(local.shape[0], local.device, group)
    return _GatherEmbeddings.apply(local, sizes, group), sizes


def gather_rows(local: Tensor, sizes: list[int], group: ProcessGroup | None) -> Tensor:
    """All-gather ragged row blocks without gradient (labels, evaluation embeddings), in rank order.

    ``sizes`` is every rank's row count, e.g. from ``gather_embeddings`` or ``even_split_sizes``.
    """
    if group_size(group) == 1:
        return local
    return _all_gather_ragged(local, sizes, group)


class _ReduceFromShards(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward."""

    @staticmethod
    def forward(ctx, partial: Tensor, group: ProcessGroup | None) -> Tensor:
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def reduce_from_shards(partial: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum per-shard partials into the global value; gradient flows to each local partial unchanged."""
    if group_size(group) == 1:
        return partial
    return _ReduceFromShards.apply(partial, group)


def all_reduce_sum(tensor: Tensor, group: ProcessGroup | None) -> Tensor:
    """Plain (non-differentiable) in-place sum across ranks, for diagnostics."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max(tensor: Tensor, group: ProcessGroup | None) -> Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def barrier(group: ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def control_group(timeout_minutes: float | None = None) -> ProcessGroup | None:
    """Collective: a gloo group for small host-side decisions, so that they never wait on a GPU stream.

    None (the default group) when the default group is gloo already or there is none. ``timeout_minutes``: how
    long a decision waits for a peer (None: gloo's default).
    """
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
    return dist.new_group(backend="gloo", timeout=timeout)


def _control_device(group: ProcessGroup | None) -> torch.device:
    """Where small control tensors live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _max_over_ranks(values: list[int], group: ProcessGroup | None) -> list[int]:
    """Collective: the element-wise maximum of small integers over the ranks (one all-reduce)."""
    if group_size(group) == 1:
        return values
    flags = torch.tensor(values, dtype=torch.int32, device=_control_device(group))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags.tolist()


def all_ranks_ok(ok: bool, group: ProcessGroup | None = None) -> bool:
    """Collective: whether ``ok`` holds on every rank, so that all ranks take the same branch after a local failure."""
    return _max_over_ranks([0 if ok else 1], group)[0] == 0


def raise_on_any_rank(error: BaseException | None, group: ProcessGroup | None = None, stop: int = 0) -> int:
    """Collective: re-raise ``error`` on the rank that hit it, and ``PeerError`` on the others.

    The rank that failed prints its one line; the others stop without adding their own. ``stop`` (a signal
    number, 0 for none) rides on the same all-reduce: returns its maximum over the ranks, so that every rank
    learns that some rank was asked to stop.
    """
    failed, stop = _max_over_ranks([0 if error is None else 1, stop], group)
    if not failed:
        return stop
    if error is not None:
        raise error
    raise PeerError("another rank stopped with an error")


_TIMED_OUT = re.compile(r"Timed out waiting (\d+)ms")
_PEER_CLOSED = re.compile(r"Connection (?:closed|reset) by peer(?: \[([^\]]+)\])?")


@contextlib.contextmanager
def naming_collective_failures(what: str, rank: int, world_size: int, hint: str = "") -> Iterator[None]:
    """Turn gloo's error for a collective that never completed into a ``CollectiveError`` of one line naming
    ``what`` was waiting, this rank, and the peer when there is only one: a peer that hung past the timeout
    ("Timed out waiting Nms") or died ("Connection closed by peer [host]"). Other errors pass through, and so
    does a ``CollectiveError`` named by an inner block. ``hint`` ends the line (the setting to change, say)."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:
        peer = f"rank {1 - rank}" if world_size == 2 else f"one of the other {world_size - 1} ranks"
        hint = f"; {hint}" if hint else ""
        if timed_out := _TIMED_OUT.search(str(error)):
            minutes = int(timed_out[1]) / 60000
            raise CollectiveError(
                f"rank {rank}: {what} timed out after {minutes:.3g} min waiting for {peer} "
                f"(a peer hung or died{hint})"
            ) from error
        if closed := _PEER_CLOSED.search(str(error)):
            host = f" on {closed[1]}" if closed[1] else ""
            raise CollectiveError(
                f"rank {rank}: {what} failed: {peer}{host} closed its connection (it stopped or died: "
                f"see its log{hint})"
            ) from error
        raise


def broadcast_message(message: str | None, group: ProcessGroup | None = None) -> str | None:
    """Collective: rank 0's ``message`` on every rank (a decision only rank 0 can take, such as a lock)."""
    if group_size(group) == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group, device=_control_device(group))
    return box[0]


def all_gather_objects(value: Any, group: ProcessGroup | None = None) -> list[Any]:
    """Collective: every rank's picklable ``value``, in rank order (small host-side records)."""
    if group_size(group) == 1:
        return [value]
    values: list[Any] = [None] * group_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def first_message(message: str | None, group: ProcessGroup | None = None) -> tuple[int, str] | None:
    """Collective: the lowest rank that has a ``message``, and that message (None: no rank has one).

    A local check that failed on some ranks: every rank takes the same branch, and one of them can say why.
    """
    messages = all_gather_objects(message, group)
    return next(((rank, text) for rank, text in enumerate(messages) if text is not None), None)


def _allreduce_sum_hook(group: ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook that sums gradients instead of averaging them."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _allreduce_sum_bf16_hook(group: ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """``_allreduce_sum_hook`` on a bf16 copy of the bucket: half the bytes on the wire, the sum back in the
    bucket's dtype. Unlike torch's ``bf16_compress_hook`` it does not divide by the world size."""
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16)
    work = dist.all_reduce(compressed, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: buffer.copy_(fut.value()[0]))


_COMM_HOOKS = {"fp32": _allreduce_sum_hook, "bf16": _allreduce_sum_bf16_hook}


def data_parallel(
    module: nn.Module, env: DistEnv, group: ProcessGroup | None = None, grad_comm: GradComm = "fp32"
) -> nn.Module:
    """Wrap the backbone in DDP with *summed* gradients (identity when running alone).

    The head's loss is already the global-batch loss and the embedding gradient
    reaching each rank is exact (reduce-scatter in ``gather_embeddings``), so each
    rank's backbone gradient is its rows' share of the global gradient: summing,
    not averaging, gives the gradient of one process on the whole batch.
    ``grad_comm`` is the precision of that sum on the wire (``train.grad_comm``).
    """
    check_choice(grad_comm, GradComm, "data_parallel grad_comm")
    if group_size(group) == 1:
        return module
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(module, device_ids=device_ids, process_group=group)
    ddp.register_comm_hook(group, _COMM_HOOKS[grad_comm])
    return ddp
