"""Margin-softmax baselines sharded like the SFace head: ArcFace, CosFace, combined, plain.

The target logit is ``s·(cos(m1·θ + m2) - m3)``, every other logit ``s·cos θ``:
ArcFace is (1, m, 0), CosFace (1, 0, m), plain normalised softmax (1, 0, 0).

Two gradients for the margined logit (``margin_grad``): ``cos``, the gradient of
``s·cos θ`` (the margin shifts the value only, as arcface_torch applies it under
no_grad), and ``exact``, the derivative of ``cos(m1·θ + m2)``, as insightface's MXNet-era
training differentiated it (docs/heads.md, Which insightface). The exact one is
``m1·sin(m1·θ + m2) / sin θ`` times that of cos θ: it vanishes as θ + m2 → π, so a
target drifting towards π - m2 is pulled back ever more weakly while its negatives are
still pushed away (past π - m2 the fallback pulls it back to the edge), and training can
settle with every target cosine near cos(π - m2) (-0.88 for ArcFace's 0.5).

The softmax normaliser spans all shards: ``distributed_cross_entropy`` all-reduces
the target logits, the row maxima and the row sums of exponentials, so only
three vectors of size B cross the network, never a [B, C] block. The loss it
returns is already the global one on every rank; as for SFace, the gather's
reduce-scatter sums each shard's share of the embedding gradient.

Under Partial FC a negative's weight ``w`` from ``head.sample_correction`` enters as
``exp(logit)·w``, i.e. ``log w`` is added to its logit: with ``inverse_rate`` the sum of
exponentials over the sampled classes is an unbiased estimate of the full one (the
log-q correction of sampled softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from sface_dist.config import (
    HeadInit,
    MarginGrad,
    MarginHeadType,
    Precision,
    SampleCorrection,
    SampleCorrectionOrAuto,
    check_choice,
)
from sface_dist.heads.precision import check_precision, matmul
from sface_dist.heads.sface import target_mask_of
from sface_dist.heads.sharded import HeadOutput, ShardedHead
from sface_dist.parallel.collectives import all_reduce_max, all_reduce_sum

MARGIN_TYPES: dict[MarginHeadType, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.4),
    "combined": (1.0, 0.3, 0.2),
    "softmax": (1.0, 0.0, 0.0),
}
"""Default (m1, m2, m3) of each margin type. ArcFace's 0.5 is every insightface version's; CosFace's 0.4
is arcface_torch's; the combined (1, 0.3, 0.2) comes from insightface's MXNet-era recognition training.
arcface_torch cannot express it: its CombinedMarginLoss ignores m1 and m2 whenever m3 > 0."""


@dataclass(frozen=True)
class MarginParams:
    """The target logit s·(cos(m1·θ + m2) − m3) and its gradient rule (``margin_target_cos``)."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    margin_grad: MarginGrad = "cos"


def margin_target_cos(cos: Tensor, params: MarginParams) -> Tensor:
    """cos(m1·θ + m2) - m3; for m1 = 1, beyond θ + m2 > π it continues as cos θ - m2·sin m2 - m3 (the
    MXNet-era ArcFace's fallback that keeps the target logit falling in θ; arcface_torch has none). Its
    gradient is that of cos θ for ``margin_grad="cos"``, its own derivative for ``"exact"``."""
    if params.m1 == 1.0 and params.m2 == 0.0:
        return cos - params.m3
    eps = 1e-7
    theta = torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))
    margined = torch.cos(params.m1 * theta + params.m2) - params.m3
    if params.m1 == 1.0:
        fallback = cos - params.m2 * math.sin(params.m2) - params.m3
        margined = torch.where(theta + params.m2 < math.pi, margined, fallback)
    if params.margin_grad == "cos":
        return cos + (margined - cos).detach()
    return margined


class _DistributedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits sharded by class; gradient (softmax - onehot)/B for this shard.

    Three all-reduces of size B: the target logits (sum: one shard owns each), the
    largest non-target logits (max) and the sums of exponentials (sum).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target_mask: Tensor, group: ProcessGroup | None) -> Tensor:
        batch, width = logits.shape
        target_logit = all_reduce_sum(torch.where(target_mask, logits, 0.0).sum(dim=1), group)
        nontarget_max = (
            logits.masked_fill(target_mask, -math.inf).amax(dim=1) if width else logits.new_full((batch,), -math.inf)
        )
        all_reduce_max(nontarget_max, group)
        row_max = torch.maximum(nontarget_max, target_logit)
        exp = torch.exp(logits - row_max.unsqueeze(1))
        sum_exp = all_reduce_sum(exp.sum(dim=1), group)
        loss = (torch.log(sum_exp) + row_max - target_logit).mean()
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(1)), target_mask)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        softmax, target_mask = ctx.saved_tensors
        grad = softmax - target_mask.to(softmax.dtype)
        return grad * (grad_loss / softmax.shape[0]), None, None


def distributed_cross_entropy(logits: Tensor, target_mask: Tensor, group: ProcessGroup | None) -> Tensor:
    """Mean cross-entropy over rows of class-sharded ``logits`` [B, C_local] whose targets are marked in
    ``target_mask`` (a row's target lies in exactly one shard)."""
    return _DistributedCrossEntropy.apply(logits, target_mask, group)


class ShardedMarginHead(ShardedHead):
    """ArcFace / CosFace / combined-margin / normalised-softmax head, sharded by class."""

    default_sample_correction: SampleCorrection = "none"
    """Measured best for ArcFace under Partial FC (docs/heads.md)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        params: MarginParams = MarginParams(),
        process_group: ProcessGroup | None = None,
        precision: Precision = "fp32",
        sample_rate: float = 1.0,
        seed: int = 0,
        init: HeadInit = "normal",
        check_inputs: bool = False,
        sample_correction: SampleCorrectionOrAuto = "auto",
        sub_centers: int = 1,
    ) -> None:
        super().__init__(
            num_classes, embedding_size, process_group, sample_rate, seed, init, check_inputs, sample_correction,
            sub_centers,
        )
        check_precision(precision)
        check_choice(params.margin_grad, MarginGrad, "head.margin_grad")
        self.params = params
        self.precision = precision

    def forward(
        self, embeddings: Tensor, labels: Tensor, step: int | None = None, micro_step: int = 0
    ) -> HeadOutput:
        """Loss and diagnostics for this rank's rows; ``step`` and ``micro_step`` pick the Partial-FC draw."""
        batch = self.gather(embeddings, labels, step, micro_step)
        w_hat = torch.nn.functional.normalize(batch.weight.to(batch.x_hat.dtype), dim=1)
        cos = matmul(batch.x_hat, w_hat.t(), self.precision).clamp(-1.0, 1.0)
        if self.sub_centers > 1:  # sub-center ArcFace: a class scores its nearest centre
            cos = cos.view(cos.shape[0], -1, self.sub_centers).amax(dim=2)
        target_mask = target_mask_of(batch.local_labels, 0, cos.shape[1])
        target_cos = torch.where(target_mask, cos, 0.0).sum(dim=1)
        logits = torch.where(target_mask, margin_target_cos(target_cos, self.params).unsqueeze(1), cos)
        logits = logits * self.params.s
        if batch.inter_scale is not None:
            logits = logits + batch.inter_scale.log()
        group = self.process_group
        loss = distributed_cross_entropy(logits, target_mask, group)
        cos, target_cos = cos.detach(), target_cos.detach()
        target_sum = target_cos.sum()
        counts = torch.stack([target_sum, cos.sum() - target_sum, (~target_mask).sum().to(cos.dtype)])
        stats = all_reduce_sum(torch.cat([counts, target_cos]), group)
        num_rows = cos.shape[0]
        nontarget = cos.masked_fill(target_mask, -math.inf)
        max_nontarget = all_reduce_max(
            nontarget.amax(dim=1) if cos.shape[1] else cos.new_full((num_rows,), -math.inf), group
        )
        return HeadOutput(
            loss=loss,
            accuracy=(stats[3:] > max_nontarget).to(stats.dtype).mean(),
            cos_target=stats[0] / num_rows,
            cos_nontarget=stats[1] / stats[2].clamp_min(1),
            sampled_rows=batch.sampled_rows,
        )

