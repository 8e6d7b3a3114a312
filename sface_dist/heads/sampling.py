"""Partial-FC negative sampling for one class shard.

Each step a shard keeps every class that is a positive of the gathered batch plus
a uniformly random subset of its other classes. A negative survives with
probability q = kept negatives / available negatives, so its inter term is
multiplied by 1/q: the expectation over draws equals the full term. Positives
(including the other rows' positives, which are negatives for this row) are
always kept with weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class SampledClasses:
    """The shard rows scored this step.

    ``rows`` are sorted local row indices; ``labels`` the gathered labels mapped into
    ``rows`` (-1 where the target is not in this shard); ``inter_scale`` the per-row
    correction 1 (positives) or 1/q (sampled negatives).
    """

    rows: Tensor
    labels: Tensor
    inter_scale: Tensor


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, rank, step): draws are reproducible and resumable."""
    state = int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def sample_classes(
    local_labels: Tensor, num_local: int, sample_rate: float, generator: torch.Generator
) -> SampledClasses:
    """Keep every positive and ``max(0, int(sample_rate·num_local) - positives)`` random negatives."""
    device = local_labels.device
    owned = local_labels[local_labels >= 0]
    positive = torch.zeros(num_local, dtype=torch.bool, device=device)
    positive[owned] = True
    num_positive = int(positive.sum())
    num_negative = num_local - num_positive
    keep_negative = min(num_negative, max(0, int(sample_rate * num_local) - num_positive))
    score = torch.rand(num_local, generator=generator, device=device)
    score[positive] = 2.0
    rows = torch.topk(score, num_positive + keep_negative, sorted=False).indices.sort().values
    position = torch.full((num_local,), -1, dtype=torch.long, device=device)
    position[rows] = torch.arange(rows.numel(), device=device)
    labels = torch.where(local_labels >= 0, position[local_labels.clamp_min(0)], -1)
    negative_weight = num_negative / keep_negative if keep_negative else 0.0
    inter_scale = torch.where(positive[rows], 1.0, negative_weight).to(torch.float32)
    return SampledClasses(rows=rows, labels=labels, inter_scale=inter_scale)
