"""The backbone's data parallelism: DDP with gradients *summed* across ranks (not averaged).

No ``from __future__ import annotations`` here: DDP reads the comm hooks' annotations at registration and
refuses a string where it expects ``dist.GradBucket``.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from sface_dist.config import GradComm, check_choice
from sface_dist.parallel.collectives import group_size
from sface_dist.parallel.launch import DistEnv


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

