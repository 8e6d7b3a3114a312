"""Classifier heads sharded by class across ranks."""

from sface_dist.heads.build import build_head, check_shard_fits
from sface_dist.heads.margin import ShardedMarginHead
from sface_dist.heads.optim import ShardOptimizer
from sface_dist.heads.sface import SFaceParams
from sface_dist.heads.sharded import HeadOutput, ShardedHead, ShardedSFaceHead

__all__ = [
    "HeadOutput",
    "SFaceParams",
    "ShardOptimizer",
    "ShardedHead",
    "ShardedMarginHead",
    "ShardedSFaceHead",
    "build_head",
    "check_shard_fits",
]
