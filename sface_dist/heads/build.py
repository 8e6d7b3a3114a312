"""``build_head``: the sharded head a ``HeadConfig`` asks for, its fused SFace block self-checked on a GPU."""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from sface_dist.config import HeadConfig, HeadType, check_choice
from sface_dist.console import say
from sface_dist.heads.impl_choice import choose_impl
from sface_dist.heads.margin import MARGIN_TYPES, MarginParams, ShardedMarginHead
from sface_dist.heads.sface import SFaceParams
from sface_dist.heads.sharded import ShardedHead, ShardedSFaceHead
from sface_dist.memory import available_memory
from sface_dist.parallel.collectives import group_rank
from sface_dist.parallel.partition import class_range

OPTIMIZER_ROW_STATES = {"sgd": 1, "adamw": 2}
"""Tensors of the head's shape its optimizer keeps (SGD's momentum; AdamW's two moments)."""


def check_shard_fits(
    num_classes: int, embedding_size: int, rank: int, world_size: int, optimizer: str, device: torch.device,
    sub_centers: int = 1,
) -> None:
    """One line, before anything is allocated, when this rank's head shard and its optimizer state (fp32) need more
    memory than ``device`` has free: a class count or an embedding size out of proportion to the machine."""
    start, end = class_range(num_classes, rank, world_size)
    needed = (end - start) * sub_centers * embedding_size * 4 * (1 + OPTIMIZER_ROW_STATES[optimizer])
    available = available_memory(device)
    if available is not None and needed > available:
        centres = f" x {sub_centers} centres" if sub_centers > 1 else ""
        raise ValueError(
            f"the head shard of rank {rank} ({end - start} of {num_classes} classes{centres} x {embedding_size}, with "
            f"{optimizer}'s state) needs {needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB free on "
            f"{device}: check data.num_classes (or the dataset's property) and model.embedding_size, or add ranks"
        )


def build_head(
    cfg: HeadConfig, num_classes: int, embedding_size: int, process_group: ProcessGroup | None, seed: int = 0
) -> ShardedHead:
    """The head of ``cfg`` for this rank of ``process_group``. Collective for SFace with ``head.impl`` ``auto`` or
    ``triton`` on a GPU, where the fused block's self-check runs first (``impl_choice.choose_impl``); rank 0
    says which block runs when that was a choice."""
    check_choice(cfg.type, HeadType, "head.type")
    common = dict(
        process_group=process_group,
        precision=cfg.precision,
        sample_rate=cfg.sample_rate,
        sample_correction=cfg.sample_correction,
        seed=seed,
        init=cfg.init,
        check_inputs=cfg.check_inputs,
        sub_centers=cfg.sub_centers,
    )
    if cfg.type == "sface":
        params = SFaceParams(s=cfg.s, k=cfg.k, a=cfg.a, b=cfg.b)
        choice = choose_impl(cfg.impl, cfg.precision, embedding_size, params, process_group, cfg.sub_centers)
        if choice.worth_saying:
            say(choice.line(), group_rank(process_group))
        return ShardedSFaceHead(
            num_classes, embedding_size, params, impl=choice.impl, chunk_size=cfg.chunk_size,
            skip_threshold=cfg.skip_threshold, **common,
        )
    m1, m2, m3 = cfg.margin or MARGIN_TYPES[cfg.type]
    params = MarginParams(s=cfg.s, m1=m1, m2=m2, m3=m3, margin_grad=cfg.margin_grad)
    return ShardedMarginHead(num_classes, embedding_size, params, **common)
