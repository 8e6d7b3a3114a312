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


def step_generator(seed: int, rank: int, step: int, device: torch.device, micro_step: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, rank, step, micro_step): draws are reproducible and resumable.

    ``micro_step`` 0 gives the generator of (seed, rank, step) alone, so a run without gradient
    accumulation draws what it drew before micro-steps existed.
    """
    entropy = [seed, rank, step, *([micro_step] if micro_step else [])]
    state = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def scored_rows(num_local: int, sample_rate: float, num_labels: int) -> int | None:
    """How many rows a draw scores, from shapes alone: ``int(sample_rate·num_local)`` when that budget
    holds every positive the ``num_labels`` gathered labels can have; None when it may not (then the
    count depends on the batch's positives)."""
    budget = int(sample_rate * num_local)
    return budget if budget >= min(num_local, num_labels) else None


def sample_classes(
    local_labels: Tensor,
    num_local: int,
    sample_rate: float,
    generator: torch.Generator,
    correction: SampleCorrection,
) -> SampledClasses:
    """Keep every positive and ``max(0, int(sample_rate·num_local) - positives)`` random negatives.

    When the budget ``int(sample_rate·num_local)`` is at least the number of gathered labels (or
    the shard's size) it holds every positive, the draw scores exactly that many rows and reads
    nothing back from the device. Otherwise (``sample_rate`` 0, or a budget below the global
    batch) the positives may exceed it: the count of positives is read on the host (one sync)
    and the draw scores ``max(budget, positives)`` rows. Both give the same rows for the same
    positives and generator.
    """
    check_choice(correction, SampleCorrection, "head.sample_correction")
    device = local_labels.device
    budget = int(sample_rate * num_local)
    owner = torch.where(local_labels >= 0, local_labels, num_local)
    positive = torch.zeros(num_local + 1, dtype=torch.bool, device=device).index_fill_(0, owner, True)[:num_local]
    num_positive = positive.sum()
    num_scored = scored_rows(num_local, sample_rate, local_labels.numel())
    if num_scored is None:
        num_scored = max(budget, int(num_positive))
    score = torch.rand(num_local, generator=generator, device=device).masked_fill_(positive, 2.0)
    rows = torch.topk(score, num_scored, sorted=False).indices.sort().values
    position = torch.full((num_local + 1,), -1, dtype=torch.long, device=device)
    position[rows] = torch.arange(num_scored, device=device)
    labels = position[owner]
    if correction == "none":
        return SampledClasses(rows, labels, None, None)
    kept_negative = num_scored - num_positive
    inverse_rate = (num_local - num_positive).double() / kept_negative.clamp_min(1).double()
    negative_weight = torch.where(kept_negative > 0, inverse_rate, 1.0)
    weight = torch.where(positive[rows], 1.0, negative_weight).to(torch.float32)
    if correction == "inverse_rate":
        return SampledClasses(rows, labels, weight, None)
    if correction == "inverse_rate_centres":
        return SampledClasses(rows, labels, None, weight)
    return SampledClasses(rows, labels, weight, weight.reciprocal())
