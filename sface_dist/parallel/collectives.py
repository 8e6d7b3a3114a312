"""The autograd-aware collectives of the sharded head, and the plain ones beside them.

The head's data flow is two collectives with autograd rules:

* ``gather_embeddings``: all-gather of ragged per-rank batches; its backward is a
  reduce-scatter (sum) of the gradient, because every rank scores every row
  against its own classes;
* ``reduce_from_shards``: all-reduce (sum) of per-shard loss partials; its
  backward is the identity, because each shard's partial depends only on that
  shard's classes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

# torch >= 2.13 renames the fixed-size collectives; older releases only have the *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_rank(group: ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def group_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


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

