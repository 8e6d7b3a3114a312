"""``build_head``: the sharded head a ``HeadConfig`` asks for, its fused SFace block self-checked on a GPU."""

from __future__ import annotations

from torch.distributed import ProcessGroup

from sface_dist.config import HeadConfig, HeadType, check_choice
from sface_dist.heads.margin import MARGIN_TYPES, ShardedMarginHead
from sface_dist.heads.self_check import checked_impl
from sface_dist.heads.sface import SFaceParams
from sface_dist.heads.sharded import ShardedHead, ShardedSFaceHead


def build_head(
    cfg: HeadConfig, num_classes: int, embedding_size: int, process_group: ProcessGroup | None, seed: int = 0
) -> ShardedHead:
    """The head of ``cfg`` for this rank of ``process_group``. Collective for SFace with ``head.impl`` ``auto`` or
    ``triton`` on a GPU: the fused block's self-check (``self_check.py``) runs first."""
    check_choice(cfg.type, HeadType, "head.type")
    common = dict(
        process_group=process_group,
        precision=cfg.precision,
        sample_rate=cfg.sample_rate,
        sample_correction=cfg.sample_correction,
        seed=seed,
        init=cfg.init,
        check_inputs=cfg.check_inputs,
    )
    if cfg.type == "sface":
        params = SFaceParams(s=cfg.s, k=cfg.k, a=cfg.a, b=cfg.b)
        impl = checked_impl(cfg.impl, cfg.precision, embedding_size, params, process_group)
        return ShardedSFaceHead(
            num_classes, embedding_size, s=cfg.s, k=cfg.k, a=cfg.a, b=cfg.b,
            impl=impl, chunk_size=cfg.chunk_size, skip_threshold=cfg.skip_threshold, **common,
        )
    m1, m2, m3 = cfg.margin or MARGIN_TYPES[cfg.type]
    return ShardedMarginHead(
        num_classes, embedding_size, s=cfg.s, m1=m1, m2=m2, m3=m3, margin_grad=cfg.margin_grad, **common
    )
