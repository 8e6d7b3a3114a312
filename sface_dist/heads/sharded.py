"""``ShardedSFaceHead``: the SFace classifier with its class centres sharded across ranks.

Per step (DESIGN.md §4): all-gather the local embeddings and labels, score all
gathered rows against this rank's contiguous class range, sum the per-shard loss
partials. The gather's backward reduce-scatters the embedding gradient; the head
weight gets its own shard's gradient and is never wrapped by DDP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from sface_dist.config import HeadConfig
from sface_dist.distributed import (
    all_reduce_max,
    all_reduce_sum,
    class_range,
    gather_embeddings,
    gather_labels,
    group_rank,
    group_size,
    reduce_from_shards,
)
from sface_dist.heads.sface import (
    NUM_SCALAR_STATS,
    BlockResult,
    SFaceParams,
    sface_block_chunked,
    sface_block_dense,
)

IMPLEMENTATIONS = ("dense", "chunked")


@dataclass
class HeadOutput:
    """Global loss (differentiable) and the official SFace diagnostics, identical on every rank."""

    loss: Tensor
    intra: Tensor
    """Mean over rows of -s·r_intra·cos θ_y."""
    inter: Tensor
    """Mean over rows of Σ_j s·r_inter·cos θ_j."""
    cos_target: Tensor
    cos_nontarget: Tensor
    accuracy: Tensor
    """Top-1 accuracy of the gathered batch over all classes."""


def resolve_impl(impl: str) -> str:
    """``auto`` -> the best implementation available here."""
    if impl == "auto":
        return "chunked"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"head.impl: expected auto or one of {', '.join(IMPLEMENTATIONS)}, got {impl!r}")
    return impl


class ShardedSFaceHead(nn.Module):
    """SFace classifier over ``num_classes`` identities, this rank holding ``class_range`` of them."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        s: float = 64.0,
        k: float = 80.0,
        a: float = 0.80,
        b: float = 1.23,
        process_group: ProcessGroup | None = None,
        impl: str = "auto",
        chunk_size: int = 0,
        init: str = "xavier",
        check_inputs: bool = False,
    ) -> None:
        super().__init__()
        world = group_size(process_group)
        if num_classes < world:
            raise ValueError(f"num_classes={num_classes} is smaller than the {world} ranks that shard it")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.params = SFaceParams(s=s, k=k, a=a, b=b)
        self.process_group = process_group
        self.impl = resolve_impl(impl)
        self.chunk_size = chunk_size
        self.check_inputs = check_inputs
        self.class_start, self.class_end = class_range(num_classes, group_rank(process_group), world)
        self.weight = nn.Parameter(torch.empty(self.class_end - self.class_start, embedding_size))
        self.reset_parameters(init)

    @classmethod
    def from_config(
        cls, cfg: HeadConfig, num_classes: int, embedding_size: int, process_group: ProcessGroup | None
    ) -> ShardedSFaceHead:
        return cls(
            num_classes,
            embedding_size,
            s=cfg.s,
            k=cfg.k,
            a=cfg.a,
            b=cfg.b,
            process_group=process_group,
            impl=cfg.impl,
            chunk_size=cfg.chunk_size,
            init=cfg.init,
        )

    @property
    def class_range(self) -> tuple[int, int]:
        return self.class_start, self.class_end

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        """``xavier``: the official SFace init, normal with std gain·sqrt(2/fan_out), gain 2, fan_out the
        global class count (so every world size draws from the same distribution); ``normal``: std 0.01."""
        if init == "xavier":
            std = 2.0 * math.sqrt(2.0 / self.num_classes)
        elif init == "normal":
            std = 0.01
        else:
            raise ValueError(f"head.init: expected xavier or normal, got {init!r}")
        self.weight.normal_(0.0, std)

    def _block(self, x_hat: Tensor, local_labels: Tensor, inv_batch: float) -> BlockResult:
        if self.impl == "dense":
            return sface_block_dense(x_hat, self.weight, local_labels, self.params, inv_batch)
        return sface_block_chunked(x_hat, self.weight, local_labels, self.params, inv_batch, self.chunk_size)

    def _check(self, embeddings: Tensor, labels: Tensor) -> None:
        """Input validation that needs a host sync: only with ``check_inputs``."""
        bad = ((labels < 0) | (labels >= self.num_classes)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"labels outside [0, {self.num_classes}) at rows {bad[:10]}: {labels[bad[:10]].tolist()}"
            )
        non_finite = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()
        if non_finite:
            raise ValueError(f"non-finite embeddings at rows {non_finite[:10]}")

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        """Loss and diagnostics for this rank's rows ``embeddings`` [b, D] with global ``labels`` [b]."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings of shape {tuple(embeddings.shape)} do not match the head's "
                f"embedding size {self.embedding_size}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} for {embeddings.shape[0]} embeddings")
        if self.check_inputs:
            self._check(embeddings, labels)
        group = self.process_group
        gathered, sizes = gather_embeddings(embeddings, group)
        all_labels = gather_labels(labels, sizes, group)
        batch = gathered.shape[0]
        x_hat = F.normalize(gathered.to(torch.promote_types(gathered.dtype, torch.float32)), dim=1)
        owned = (all_labels >= self.class_start) & (all_labels < self.class_end)
        local_labels = torch.where(owned, all_labels - self.class_start, -1)
        block = self._block(x_hat, local_labels, 1.0 / batch)
        loss = reduce_from_shards(block.loss, group)
        stats = all_reduce_sum(torch.cat([block.scalar_stats, block.cos_target.to(block.scalar_stats.dtype)]), group)
        max_nontarget = all_reduce_max(block.max_nontarget.clone(), group)
        intra_sum, inter_sum, cos_target_sum, cos_nontarget_sum, nontarget_count = stats[:NUM_SCALAR_STATS]
        cos_target = stats[NUM_SCALAR_STATS:]
        return HeadOutput(
            loss=loss,
            intra=intra_sum / batch,
            inter=inter_sum / batch,
            cos_target=cos_target_sum / batch,
            cos_nontarget=cos_nontarget_sum / nontarget_count.clamp_min(1),
            accuracy=(cos_target > max_nontarget).to(stats.dtype).mean(),
        )
