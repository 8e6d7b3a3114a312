"""Partial-FC negative sampling for one class shard.

Each step a shard keeps every class that is a positive of the gathered batch plus
a uniformly random subset of its other classes. A negative survives with
probability q = kept negatives / available negatives. ``sample_correction`` says
what the sampled negatives weigh:

* ``none``: 1, as in insightface's Partial FC. The negatives' term is, in
  expectation, q times the full head's.
* ``inverse_rate``: 1/q in the loss, so the loss and both gradients are unbiased
  estimates of the full head's.
* ``inverse_rate_centres``: 1 in the loss and the embeddings' gradient,
  1/q on the class centres' gradient. Each centre is, in expectation, pushed as hard
  as by the full head, while the embeddings' gradient, which every backbone weight
  shares, keeps the low variance of ``none``.
* ``inverse_rate_embeddings``: the mirror image: 1/q on the embeddings, 1 on the centres.

Positives, including the other rows' positives (negatives for this row), are
always kept with weight 1. Each head type names the correction that learns best
with it (``ShardedHead.default_sample_correction``, measured in docs/heads.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sface_dist.config import SampleCorrection, check_choice


@dataclass
class SampledClasses:
    """The shard rows scored this step.

    ``rows`` are sorted local row indices; ``labels`` the gathered labels mapped into
    ``rows`` (-1 where the target is not in this shard). Per scored row, ``inter_scale``
    multiplies the row's negative term in the loss and ``centre_grad_scale`` the row's
    gradient; None means 1.
    """

    rows: Tensor
    labels: Tensor
    inter_scale: Tensor | None
    centre_grad_scale: Tensor | None


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, rank, step): draws are reproducible and resumable."""
    state = int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def sample_classes(
    local_labels: Tensor,
    num_local: int,
    sample_rate: float,
    generator: torch.Generator,
    correction: SampleCorrection,
) -> SampledClasses:
    """Keep every positive and ``max(0, int(sample_rate·num_local) - positives)`` random negatives."""
    check_choice(correction, SampleCorrection, "head.sample_correction")
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
    if correction == "none":
        return SampledClasses(rows, labels, None, None)
    inverse_rate = num_negative / keep_negative if keep_negative else 1.0
    weight = torch.where(positive[rows], 1.0, inverse_rate).to(torch.float32)
    if correction == "inverse_rate":
        return SampledClasses(rows, labels, weight, None)
    if correction == "inverse_rate_centres":
        return SampledClasses(rows, labels, None, weight)
    return SampledClasses(rows, labels, weight, weight.reciprocal())
