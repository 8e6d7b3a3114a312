"""Partial FC must learn about as fast as the full head.

A small problem that keeps the demo's proportions (800 identities, global batch 128, so about
120 positives per batch and a rate-0.3 draw keeps q ≈ 0.18 of the negatives): fixed noisy
samples around one point per class, an MLP with BatchNorm, the trainer's optimizers (SGD on the
backbone with gradient clipping at 5, ``ShardOptimizer`` (SGD) on the head), warmup and the poly schedule.
The default sampled head's training accuracy must track the full head's while it rises.

The margin: on this problem the full head's training accuracy over the first half of the run
averages ~0.89. Measured lags behind it (mean of 2 seeds): ``inverse_rate_centres`` 0.05,
``inverse_rate_embeddings`` 0.05, ``none`` -0.01 (it leads), ``inverse_rate`` 0.14 (the
variant that learns slowly on the demo, docs/heads.md). MARGIN sits half-way between the
default and ``inverse_rate``, and the test checks that ``inverse_rate`` fails it, so it can fail.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from sface_dist.config import HeadConfig
from sface_dist.heads import ShardOptimizer, build_head

NUM_CLASSES, PER_CLASS, BATCH, STEPS = 800, 20, 128, 300
INPUT, EMBEDDING, NOISE, LR = 64, 128, 1.0, 0.1
MARGIN = 0.09
SEEDS = (0, 1)


@functools.cache
def training_accuracy(sample_rate: float, correction: str, update: str, seed: int) -> tuple[float, ...]:
    """The batch training accuracy the head reports, averaged over each tenth of the run."""
    head_config = HeadConfig(impl="dense", sample_rate=sample_rate, sample_correction=correction, sample_update=update)
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, INPUT, generator=generator)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    inputs = centres[labels] + NOISE * torch.randn(len(labels), INPUT, generator=generator)
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(INPUT, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, EMBEDDING),
                             nn.BatchNorm1d(EMBEDDING))
    head = build_head(head_config, NUM_CLASSES, EMBEDDING, None, seed)
    backbone_optimizer = torch.optim.SGD(backbone.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    head_optimizer = ShardOptimizer(
        head, lr=LR, momentum=0.9, weight_decay=5e-4, sample_update=head_config.sample_update
    )
    accuracy = []
    for step in range(STEPS):
        lr = LR * min(1.0, (step + 1) / 20) * (1 - step / STEPS) ** 2
        rows = torch.randint(0, len(labels), (BATCH,), generator=generator)
        out = head(backbone(inputs[rows]), labels[rows], step=step + 1)
        out.loss.backward()
        nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        for optimizer in (backbone_optimizer, head_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = lr
        backbone_optimizer.step()
        head_optimizer.step(out.sampled_rows)
        backbone_optimizer.zero_grad()
        head_optimizer.zero_grad()
        accuracy.append(float(out.accuracy))
    tenth = STEPS // 10
    return tuple(sum(accuracy[i : i + tenth]) / tenth for i in range(0, STEPS, tenth))


def lag_behind_full_head(sampled: HeadConfig) -> float:
    """Mean over seeds and over the first half of the run of (full head's accuracy - sampled head's)."""
    lags = []
    for seed in SEEDS:
        full = training_accuracy(1.0, "none", "rows", seed)
        drawn = training_accuracy(sampled.sample_rate, sampled.sample_correction, sampled.sample_update, seed)
        lags += [f - d for f, d in zip(full[1:6], drawn[1:6], strict=True)]
    return sum(lags) / len(lags)


def test_default_partial_fc_learns_as_fast_as_the_full_head() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        default_lag = lag_behind_full_head(HeadConfig(impl="dense", sample_rate=0.3))
        slowed_lag = lag_behind_full_head(HeadConfig(impl="dense", sample_rate=0.3, sample_correction="inverse_rate"))
    finally:
        torch.set_num_threads(threads)
    assert default_lag < MARGIN
    assert slowed_lag > MARGIN, "the check must catch a variant known to learn slowly"
