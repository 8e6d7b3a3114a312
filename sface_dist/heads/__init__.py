"""Classifier heads sharded by class across ranks."""

from sface_dist.heads.sface import SFaceParams
from sface_dist.heads.sharded import HeadOutput, ShardedSFaceHead

__all__ = ["HeadOutput", "SFaceParams", "ShardedSFaceHead"]
