"""Classifier heads whose class centres are sharded across ranks.

``ShardedHead`` owns what every sharded head shares: the contiguous class
partition, the all-gather of embeddings and labels, Partial-FC sampling and input
checks. ``ShardedSFaceHead`` scores the gathered rows with the SFace block math
(docs/design.md, The SFace loss and Sharding): its shards exchange nothing but the loss partials. The margin
baselines (``sface_dist/heads/margin.py``) add a distributed softmax.

The head is never wrapped by DDP: each shard has its own gradient and optimizer
state (``sface_dist/heads/optim.py``).

A head holds no state that a forward call advances: the Partial-FC draw is a function of
(seed, rank, step, micro_step), all passed in or fixed at construction, so an extra forward
(a debugging probe, an evaluation of the loss) changes no later draw.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from sface_dist.config import (
    HeadInit,
    Precision,
    SampleCorrection,
    SampleCorrectionOrAuto,
    SFaceImpl,
    check_choice,
)
from sface_dist.heads.kernels.fused import sface_block_triton
from sface_dist.heads.precision import check_precision
from sface_dist.heads.sampling import sample_classes, step_generator
from sface_dist.heads.sface import (
    NUM_SCALAR_STATS,
    BlockFn,
    BlockOptions,
    SFaceParams,
    sface_block_chunked,
    sface_block_dense,
)
from sface_dist.parallel.collectives import (
    all_reduce_max,
    all_reduce_sum,
    gather_embeddings,
    gather_rows,
    group_rank,
    group_size,
    reduce_from_shards,
)
from sface_dist.parallel.partition import class_range


@dataclass
class HeadOutput:
    """Global loss (differentiable) and diagnostics, identical on every rank (except ``sampled_rows``)."""

    loss: Tensor
    accuracy: Tensor
    """Top-1 accuracy of the gathered batch by cosine (nearest centre) over the scored classes of all shards, for
    every head type (a margin shapes the loss, not the prediction)."""
    cos_target: Tensor
    """Mean cosine between each row and its class centre."""
    cos_nontarget: Tensor
    """Mean cosine between each row and the scored centres of the other classes."""
    sampled_rows: Tensor | None
    """This shard's rows scored by the forward (sorted local indices; None: all of them): what the
    shard optimizer updates under ``sample_update="rows"``."""
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    """Terms only this head type has, by name. SFace: ``intra`` and ``inter``, the means over rows of
    -s·r_intra·cos θ_y and Σ_j s·r_inter·cos θ_j; the margin heads have none."""


@dataclass
class GatheredBatch:
    """The global batch as one shard sees it."""

    x_hat: Tensor
    """Normalised gathered embeddings [B, D], fp32 (fp64 stays fp64)."""
    labels: Tensor
    """Global labels [B]."""
    local_labels: Tensor
    """Row index of each target in the scored weight rows; -1 where another shard owns it."""
    weight: Tensor
    """The weight rows scored this step (all of the shard, or the Partial-FC sample)."""
    inter_scale: Tensor | None
    """Per scored row, the weight of its negative term (``sface_dist/heads/sampling.py``); None: 1."""
    sampled_rows: Tensor | None
    """The shard rows in ``weight`` (sorted local indices); None: every row."""


INIT_BLOCK_CLASSES = 4096
SUB_CENTER_SEED_STRIDE = 7919
"""Sub-centre k is initialised from seed + k · this (a prime): k = 0 is the one-centre head's draw."""


def initial_weight_rows(
    num_classes: int, embedding_size: int, rows: tuple[int, int], init: HeadInit, seed: int
) -> Tensor:
    """Rows ``[start, end)`` of the initial class-centre matrix, the same whatever the world size.

    ``xavier``: the official SFace init, normal with std gain·sqrt(2/fan_out), gain 2 and
    fan_out the global class count; ``normal``: std 0.01. Values are drawn in blocks of
    INIT_BLOCK_CLASSES classes, each from a generator seeded by (seed, block), so a shard
    draws only the blocks it overlaps and no two shards repeat each other's draws.
    """
    check_choice(init, HeadInit, "head.init")
    std = 2.0 * math.sqrt(2.0 / num_classes) if init == "xavier" else 0.01
    start, end = rows
    out = torch.empty(end - start, embedding_size)
    first_block = start - start % INIT_BLOCK_CLASSES
    for block_start in range(first_block, end, INIT_BLOCK_CLASSES):
        block_end = min(block_start + INIT_BLOCK_CLASSES, num_classes)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block_start // INIT_BLOCK_CLASSES)
        block = torch.randn(block_end - block_start, embedding_size, generator=generator).mul_(std)
        lo, hi = max(start, block_start), min(end, block_end)
        out[lo - start : hi - start] = block[lo - block_start : hi - block_start]
    return out


class ShardedHead(nn.Module):
    """Class partition, gather, sampling and checks shared by the sharded heads.

    Under Partial FC (``sample_rate < 1``) the rows a forward scores are drawn from a generator
    seeded by (seed, rank, ``step``, ``micro_step``): ``step`` is the optimizer step the forward
    contributes to, counted from 1 (the trainer passes the number of steps taken + 1), and
    ``micro_step`` the forward's index within that step, 0 to k-1 for k accumulated micro-batches
    (0 without accumulation). The same arguments give the same draw, so a resumed run repeats
    the draws of an uninterrupted one.
    """

    default_sample_correction: SampleCorrection = "none"
    """What ``sample_correction="auto"`` means for this head type: the correction that learns best with it."""
    impl: str | None = None
    """The implementation of the head's block where it has several (SFace's ``head.impl``)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        process_group: ProcessGroup | None = None,
        sample_rate: float = 1.0,
        seed: int = 0,
        init: HeadInit = "xavier",
        check_inputs: bool = False,
        sample_correction: SampleCorrectionOrAuto = "auto",
        sub_centers: int = 1,
    ) -> None:
        super().__init__()
        world = group_size(process_group)
        if sub_centers < 1:
            raise ValueError(f"head.sub_centers: expected a count >= 1, got {sub_centers}")
        if num_classes < world:
            raise ValueError(f"num_classes={num_classes} is smaller than the {world} ranks that shard it")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"head.sample_rate: expected a value in [0, 1], got {sample_rate}")
        check_choice(sample_correction, SampleCorrectionOrAuto, "head.sample_correction")
        if sample_correction == "auto":
            sample_correction = self.default_sample_correction
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.process_group = process_group
        self.sample_rate = sample_rate
        self.sample_correction = sample_correction
        self.seed = seed
        self.check_inputs = check_inputs
        self.rank = group_rank(process_group)
        self.class_start, self.class_end = class_range(num_classes, self.rank, world)
        self.sub_centers = sub_centers
        self.weight = nn.Parameter(torch.empty((self.class_end - self.class_start) * sub_centers, embedding_size))
        """The centres, class-major: class ``class_start + c`` owns rows ``c·K .. c·K + K - 1``."""
        self.reset_parameters(init)

    @property
    def class_range(self) -> tuple[int, int]:
        return self.class_start, self.class_end

    def centre_rows(self, classes: Tensor) -> Tensor:
        """The weight rows of local ``classes``: each class's K sub-centres, in class-major order."""
        if self.sub_centers == 1:
            return classes
        offsets = torch.arange(self.sub_centers, device=classes.device)
        return (classes.unsqueeze(1) * self.sub_centers + offsets).flatten()

    @torch.no_grad()
    def keep_centres(self, which: Tensor) -> None:
        """Keep centre ``which[c]`` of each local class c and train on with one centre a class (the sub-centre
        drop step): the weight becomes a new [C, D] parameter."""
        rows = torch.arange(self.class_end - self.class_start, device=which.device)
        kept = self.weight.view(-1, self.sub_centers, self.embedding_size)[rows, which]
        self.weight = nn.Parameter(kept.clone())
        self.sub_centers = 1

    def by_class(self, rows: Tensor) -> Tensor:
        """A per-centre tensor [C·K, ...] as [C, K, ...] with sub-centres, unchanged without: what checkpoints
        hold, so that they re-partition by class."""
        return rows if self.sub_centers == 1 else rows.view(-1, self.sub_centers, *rows.shape[1:])

    @torch.no_grad()
    def reset_parameters(self, init: HeadInit) -> None:
        """Sub-centre k of every class draws from its own seed (k = 0 from the head's: one centre a class is the
        plain head's initialisation), each the same whatever the world size."""
        centres = [initial_weight_rows(self.num_classes, self.embedding_size, self.class_range, init,
                                       self.seed + SUB_CENTER_SEED_STRIDE * k) for k in range(self.sub_centers)]
        self.weight.copy_(torch.stack(centres, dim=1).flatten(0, 1))

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The weight rows with the class range they hold: ``{"class_start", "class_end", "num_classes",
        "rows": {"weight": [end - start, D]}}`` (with sub-centres ``[end - start, K, D]``). Checkpoints
        re-partition it by slicing ``rows``."""
        return {
            "class_start": self.class_start,
            "class_end": self.class_end,
            "num_classes": self.num_classes,
            "rows": {"weight": self.by_class(self.weight.detach())},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a ``state_dict()`` of exactly this shard's class range (re-partitioning is the checkpoint's job)."""
        saved = (state["class_start"], state["class_end"], state["num_classes"])
        if saved != (self.class_start, self.class_end, self.num_classes):
            raise ValueError(
                f"head state holds classes [{saved[0]}, {saved[1]}) of {saved[2]}, this shard "
                f"[{self.class_start}, {self.class_end}) of {self.num_classes}"
            )
        weight = state["rows"]["weight"]
        if weight.dim() == 2 and self.sub_centers > 1:  # written after the sub-centre drop: one centre a class
            self.keep_centres(torch.zeros(self.class_end - self.class_start, dtype=torch.long))
        expected = self.by_class(self.weight).shape
        if weight.shape != expected:
            saved_k = 1 if weight.dim() == 2 else weight.shape[1]
            if saved_k != self.sub_centers:
                raise ValueError(f"head state holds {saved_k} centre(s) a class, the head {self.sub_centers} "
                                 f"(head.sub_centers)")
            raise ValueError(f"head rows are {weight.shape[-1]}-d, the head's embedding size is {expected[-1]}")
        self.weight.copy_(weight.reshape(self.weight.shape))

    def _check(self, embeddings: Tensor, labels: Tensor) -> None:
        """Validation that needs a host sync: only with ``check_inputs`` (a debug option)."""
        bad = ((labels < 0) | (labels >= self.num_classes)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"labels outside [0, {self.num_classes}) at rows {bad[:10]}: {labels[bad[:10]].tolist()}"
            )
        non_finite = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()
        if non_finite:
            raise ValueError(f"non-finite embeddings at rows {non_finite[:10]}")

    def gather(self, embeddings: Tensor, labels: Tensor, step: int | None, micro_step: int) -> GatheredBatch:
        """All-gather this step's rows and pick the weight rows to score (the draw of (step, micro_step))."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings of shape {tuple(embeddings.shape)} do not match the head's "
                f"embedding size {self.embedding_size}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} for {embeddings.shape[0]} embeddings")
        if self.check_inputs:
            self._check(embeddings, labels)
        gathered, sizes = gather_embeddings(embeddings, self.process_group)
        all_labels = gather_rows(labels, sizes, self.process_group)
        x_hat = F.normalize(gathered.to(torch.promote_types(gathered.dtype, torch.float32)), dim=1)
        owned = (all_labels >= self.class_start) & (all_labels < self.class_end)
        local_labels = torch.where(owned, all_labels - self.class_start, -1)
        if self.sample_rate >= 1.0:
            return GatheredBatch(x_hat, all_labels, local_labels, self.weight, None, None)
        if step is None:
            raise ValueError("head.sample_rate < 1: the Partial-FC draw needs its step, as in head(x, y, step=...)")
        generator = step_generator(self.seed, self.rank, step, local_labels.device, micro_step)
        sample = sample_classes(local_labels, self.class_end - self.class_start, self.sample_rate, generator,
                                self.sample_correction)
        weight = self.weight.index_select(0, self.centre_rows(sample.rows))
        if sample.centre_grad_scale is not None and weight.requires_grad:
            centre_scale = sample.centre_grad_scale.to(weight.dtype).repeat_interleave(self.sub_centers).unsqueeze(1)
            weight.register_hook(lambda grad: grad * centre_scale)
        inter_scale = None if sample.inter_scale is None else sample.inter_scale.to(x_hat.dtype)
        return GatheredBatch(x_hat, all_labels, sample.labels, weight, inter_scale, sample.rows)


class ShardedSFaceHead(ShardedHead):
    """SFace classifier over ``num_classes`` identities, this rank holding ``class_range`` of them."""

    default_sample_correction: SampleCorrection = "inverse_rate_centres"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        params: SFaceParams = SFaceParams(),
        process_group: ProcessGroup | None = None,
        impl: SFaceImpl = "chunked",
        chunk_size: int = 0,
        precision: Precision = "fp32",
        sample_rate: float = 1.0,
        seed: int = 0,
        init: HeadInit = "xavier",
        check_inputs: bool = False,
        skip_threshold: float = 0.0,
        sample_correction: SampleCorrectionOrAuto = "auto",
        sub_centers: int = 1,
    ) -> None:
        super().__init__(
            num_classes, embedding_size, process_group, sample_rate, seed, init, check_inputs, sample_correction,
            sub_centers,
        )
        check_precision(precision)
        if skip_threshold < 0.0:
            raise ValueError(f"head.skip_threshold: expected a value >= 0, got {skip_threshold}")
        check_choice(impl, SFaceImpl, "head.impl")
        if impl == "triton" and sub_centers > 1:
            raise ValueError("head.impl=triton: the fused kernels score one centre a class; with head.sub_centers "
                             f"{sub_centers} use head.impl=chunked (auto picks it)")
        self.params = params
        self.impl = impl
        self.precision = precision
        self.block_fn: BlockFn = {
            "dense": sface_block_dense,
            "chunked": functools.partial(sface_block_chunked, chunk_size=chunk_size),
            "triton": functools.partial(sface_block_triton, skip_threshold=skip_threshold),
        }[self.impl]

    def forward(
        self, embeddings: Tensor, labels: Tensor, step: int | None = None, micro_step: int = 0
    ) -> HeadOutput:
        """Loss and diagnostics for this rank's rows ``embeddings`` [b, D] with global ``labels`` [b].

        ``step`` and ``micro_step`` pick the Partial-FC draw (required when sampling; see ``ShardedHead``).
        """
        batch = self.gather(embeddings, labels, step, micro_step)
        options = BlockOptions(inv_batch=1.0 / batch.x_hat.shape[0], precision=self.precision,
                               sub_centers=self.sub_centers)
        block = self.block_fn(batch.x_hat, batch.weight, batch.local_labels, batch.inter_scale, self.params, options)
        group = self.process_group
        loss = reduce_from_shards(block.loss, group)
        stats = all_reduce_sum(torch.cat([block.scalar_stats, block.cos_target.to(block.scalar_stats.dtype)]), group)
        max_nontarget = all_reduce_max(block.max_nontarget.clone(), group)
        intra_sum, inter_sum, cos_target_sum, cos_nontarget_sum, nontarget_count = stats[:NUM_SCALAR_STATS]
        cos_target = stats[NUM_SCALAR_STATS:]
        rows = batch.x_hat.shape[0]
        return HeadOutput(
            loss=loss,
            accuracy=(cos_target > max_nontarget).to(stats.dtype).mean(),
            cos_target=cos_target_sum / rows,
            cos_nontarget=cos_nontarget_sum / nontarget_count.clamp_min(1),
            sampled_rows=batch.sampled_rows,
            diagnostics={"intra": intra_sum / rows, "inter": inter_sum / rows},
        )
