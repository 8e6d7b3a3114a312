"""SFace math on one block of classes: loss partial, gradients and diagnostics.

For normalised rows x̂_i and class centres ŵ_j, cos_ij = x̂_i·ŵ_j and, with the
sigmoid re-scale weights under stop-gradient (docs/design.md, The SFace loss),

    L = (1/B) Σ_i [ -s·r_intra(θ_iy)·cos_iy + Σ_{j≠y} s·r_inter(θ_ij)·cos_ij ]

so L = Σ_ij G_ij·cos_ij with G = ∂L/∂cos known as soon as cos is. A block only
needs its own classes: shards never exchange softmax statistics.

Two implementations share one signature (``BlockFn``):

* ``sface_block_dense``: autograd through the [B, C] cosine block — the reference;
* ``sface_block_chunked``: walks the classes in chunks and produces the loss and
  both gradients in one pass, keeping extra memory O(B·chunk + C·D).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sface_dist.config import Precision
from sface_dist.heads.precision import matmul

NUM_SCALAR_STATS = 5
"""intra sum, inter sum, target-cos sum, non-target-cos sum, non-target count."""


@dataclass(frozen=True)
class SFaceParams:
    """Loss hyper-parameters (official defaults: s=64, k=80, a=0.80, b=1.23)."""

    s: float = 64.0
    k: float = 80.0
    a: float = 0.80
    b: float = 1.23


@dataclass
class BlockResult:
    """What one block of classes contributes.

    ``loss`` is this block's partial of the global loss (differentiable);
    ``scalar_stats`` holds the NUM_SCALAR_STATS sums; ``cos_target`` is each row's
    target cosine (0 where the target is in another block) and ``max_nontarget`` each
    row's largest non-target cosine in this block (-inf if none).
    """

    loss: Tensor
    scalar_stats: Tensor
    cos_target: Tensor
    max_nontarget: Tensor


@dataclass(frozen=True)
class BlockOptions:
    """How one block is computed.

    ``inv_batch`` is 1/B for the global batch B. ``precision`` is the operand type of
    the three matmuls (cos, ∂x̂, ∂ŵ); accumulation, normalisation and the sigmoid
    weights stay in fp32 or wider.
    """

    inv_batch: float
    precision: Precision = "fp32"
    sub_centers: int = 1
    """Centres per class: the weight holds K rows per class, class-major, and a class's cosine is the largest of
    its K (docs/heads.md, Sub-centres)."""


BlockFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", SFaceParams, BlockOptions], BlockResult]
"""(x_hat [B, D], weight [C, D], local_labels [B] (-1: not in block), inter_scale [C] or None,
params, options) -> BlockResult. ``inter_scale`` multiplies each class's inter term (the
Partial-FC correction for sampled negatives); None means 1."""


def sigmoid_weights(cos: Tensor, params: SFaceParams) -> tuple[Tensor, Tensor]:
    """r_intra(θ) and r_inter(θ) for θ = acos(clamp(cos)), in at least fp32.

    The clamp matters: fp32 self-dots exceed 1 and an unclamped acos returns NaN.
    """
    dtype = torch.promote_types(cos.dtype, torch.float32)
    theta = torch.acos(cos.detach().to(dtype).clamp(-1.0, 1.0))
    r_intra = torch.sigmoid(params.k * (theta - params.a))
    r_inter = torch.sigmoid(-params.k * (theta - params.b))
    return r_intra, r_inter


def cos_gradient(
    cos: Tensor, target_mask: Tensor, inter_scale: Tensor | None, params: SFaceParams, inv_batch: float
) -> Tensor:
    """G = ∂L/∂cos: -(s/B)·r_intra on targets, (s/B)·r_inter·inter_scale elsewhere."""
    r_intra, r_inter = sigmoid_weights(cos, params)
    if inter_scale is not None:
        r_inter = r_inter * inter_scale.to(r_inter.dtype)
    return torch.where(target_mask, -r_intra, r_inter) * (params.s * inv_batch)


def target_cosines(x_hat: Tensor, weight: Tensor, local_labels: Tensor, sub_centers: int = 1) -> Tensor:
    """Each row's target cosine in the input precision ([B]; rows whose target is elsewhere get 0); with
    sub-centres, the largest over the target's K.

    With k=80 the intra weight moves by up to 0.02 per 1e-3 of cosine error near θ=a,
    so the target cosines — B·K dot products — are never taken from a low-precision matmul.
    """
    centres = weight.view(-1, sub_centers, weight.shape[1])[local_labels.clamp_min(0)].to(x_hat.dtype)
    cos = (x_hat.unsqueeze(1) * centres).sum(dim=2) / centres.norm(dim=2).clamp_min(1e-12)
    return torch.where(local_labels >= 0, cos.amax(dim=1), 0.0)


def class_cosines(centre_cosines: Tensor, sub_centers: int) -> tuple[Tensor, Tensor | None]:
    """[B, C·K] cosines against every centre to [B, C] class cosines, each the largest of its class's K centres,
    and which centre that is (None when K = 1)."""
    if sub_centers == 1:
        return centre_cosines, None
    cos, nearest = centre_cosines.view(centre_cosines.shape[0], -1, sub_centers).max(dim=2)
    return cos, nearest


def centre_gradient(grad_cos: Tensor, nearest: Tensor | None, sub_centers: int) -> Tensor:
    """∂L/∂(centre cosines) [B, C·K] from ∂L/∂(class cosines) [B, C]: all of it to each class's nearest centre."""
    if nearest is None:
        return grad_cos
    grad = grad_cos.new_zeros(grad_cos.shape[0], grad_cos.shape[1], sub_centers)
    grad.scatter_(2, nearest.unsqueeze(2), grad_cos.unsqueeze(2))
    return grad.view(grad_cos.shape[0], -1)


def target_mask_of(local_labels: Tensor, start: int, width: int) -> Tensor:
    """[B, width] boolean mask of each row's target inside classes [start, start+width)."""
    columns = torch.arange(start, start + width, device=local_labels.device)
    return local_labels.unsqueeze(1) == columns.unsqueeze(0)


def _block_stats(cos: Tensor, grad_cos: Tensor, target_mask: Tensor, inv_batch: float) -> Tensor:
    """Scalar sums of one cosine block (no gradient, no host sync)."""
    cos = cos.detach()
    weighted = (grad_cos * cos) / inv_batch
    weighted_target = torch.where(target_mask, weighted, 0.0).sum()
    cos_target = torch.where(target_mask, cos, 0.0).sum()
    num_targets = target_mask.sum().to(cos.dtype)
    return torch.stack(
        [
            weighted_target,
            weighted.sum() - weighted_target,
            cos_target,
            cos.sum() - cos_target,
            cos.numel() - num_targets,
        ]
    ).to(torch.promote_types(cos.dtype, torch.float32))


def _row_extremes(cos: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    cos = cos.detach()
    cos_target = torch.where(target_mask, cos, torch.zeros_like(cos)).sum(dim=1)
    max_nontarget = cos.masked_fill(target_mask, -math.inf).amax(dim=1) if cos.shape[1] else cos.new_full(
        (cos.shape[0],), -math.inf
    )
    return cos_target, max_nontarget


def _exact_targets(x_hat: Tensor, weight: Tensor, local_labels: Tensor, options: BlockOptions) -> Tensor | None:
    """[B, 1] full-precision target cosines to replace the matmul's, or None when the matmul is fp32."""
    if options.precision == "fp32":
        return None
    return target_cosines(x_hat, weight, local_labels, options.sub_centers).unsqueeze(1)


def _score(
    x_hat: Tensor,
    w_hat: Tensor,
    local_labels: Tensor,
    start: int,
    exact_targets: Tensor | None,
    inter_scale: Tensor | None,
    params: SFaceParams,
    options: BlockOptions,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Cosines of the rows against classes ``start ..`` (their centres ``w_hat``), G = ∂L/∂cos, the target mask
    and each class's nearest sub-centre (None without sub-centres)."""
    target_mask = target_mask_of(local_labels, start, w_hat.shape[0] // options.sub_centers)
    cos, nearest = class_cosines(matmul(x_hat, w_hat.t(), options.precision), options.sub_centers)
    if exact_targets is not None:
        cos = torch.where(target_mask, exact_targets, cos)
    grad_cos = cos_gradient(cos, target_mask, inter_scale, params, options.inv_batch).to(cos.dtype)
    return cos, grad_cos, target_mask, nearest


def _summarise(cos: Tensor, grad_cos: Tensor, target_mask: Tensor, inv_batch: float) -> BlockResult:
    """Loss partial (differentiable through ``cos``), statistics and row extremes of scored classes."""
    cos_target, max_nontarget = _row_extremes(cos, target_mask)
    return BlockResult(
        (grad_cos * cos).sum(), _block_stats(cos, grad_cos, target_mask, inv_batch), cos_target, max_nontarget
    )


def sface_block_dense(
    x_hat: Tensor,
    weight: Tensor,
    local_labels: Tensor,
    inter_scale: Tensor | None,
    params: SFaceParams,
    options: BlockOptions,
) -> BlockResult:
    """Reference: materialise the [B, C] cosines and let autograd differentiate."""
    w_hat = F.normalize(weight.to(x_hat.dtype), dim=1)
    exact_targets = _exact_targets(x_hat, weight, local_labels, options)
    cos, grad_cos, target_mask, _ = _score(x_hat, w_hat, local_labels, 0, exact_targets, inter_scale, params, options)
    return _summarise(cos, grad_cos, target_mask, options.inv_batch)


DEFAULT_CHUNK_BUDGET_BYTES = 64 * 2**20


def chunk_temporary_bytes(batch: int, rows: int, dim: int) -> int:
    """The chunked block's temporaries for a chunk of ``rows`` centres: about 4 [B, rows] fp32 tensors (cosines,
    their gradient, masks) and 4 [rows, D] (the rows cast, normalised, their gradient and its tangent part). At
    small batches the [rows, D] ones dominate."""
    return 4 * 4 * rows * (max(batch, 1) + dim)


def auto_chunk_size(batch: int, num_classes: int, dim: int, sub_centers: int = 1,
                    budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Classes per chunk so that one chunk's temporaries (``chunk_temporary_bytes``, ``sub_centers`` rows a class)
    fit in ``budget_bytes``."""
    per_class = chunk_temporary_bytes(batch, sub_centers, dim)
    return int(max(1, min(num_classes, budget_bytes // per_class)))


class GradientsInForward(torch.autograd.Function):
    """Base of the blocks that compute ∂L/∂x̂ and ∂L/∂W in forward (G = ∂L/∂cos is known there).

    ``forward`` stores ``ctx.gradients = (grad_x_hat, grad_weight)``; backward scales them in
    place by the incoming gradient: no second [C, D] buffer at the memory peak, and autograd
    takes ∂L/∂W over as the parameter's gradient without a copy. The first two inputs must be
    x̂ and the weight; the rest get no gradient.
    """

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.gradients is None:
            raise RuntimeError("an SFace block supports one backward pass per forward")
        grad_x_hat, grad_weight = ctx.gradients
        ctx.gradients = None
        no_gradient = (None,) * (len(ctx.needs_input_grad) - 2)
        return (grad_x_hat.mul_(grad_loss), grad_weight.mul_(grad_loss), *no_gradient)


class _ChunkedSFace(GradientsInForward):
    """Loss and both gradients in one pass over class chunks.

    No [B, C] tensor is ever held: each chunk's cosines become its share of the loss,
    the diagnostics and both gradients before the next chunk is computed.
    """

    @staticmethod
    def forward(
        ctx,
        x_hat: Tensor,
        weight: Tensor,
        local_labels: Tensor,
        inter_scale: Tensor | None,
        params: SFaceParams,
        options: BlockOptions,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k = options.sub_centers
        batch, num_classes = x_hat.shape[0], weight.shape[0] // k
        compute_dtype = x_hat.dtype
        loss = x_hat.new_zeros((), dtype=torch.promote_types(compute_dtype, torch.float32))
        stats = loss.new_zeros(NUM_SCALAR_STATS)
        cos_target = x_hat.new_zeros(batch)
        max_nontarget = x_hat.new_full((batch,), -math.inf)
        grad_x_hat = torch.zeros_like(x_hat)
        grad_weight = torch.empty_like(weight)
        exact_targets = _exact_targets(x_hat, weight, local_labels, options)
        for start in range(0, num_classes, chunk_size):
            rows = slice(start * k, (start + chunk_size) * k)
            w = weight[rows].to(compute_dtype)
            norm = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            w_hat = w / norm
            scale = None if inter_scale is None else inter_scale[start : start + chunk_size]
            cos, grad_cos, target_mask, nearest = _score(
                x_hat, w_hat, local_labels, start, exact_targets, scale, params, options
            )
            chunk = _summarise(cos, grad_cos, target_mask, options.inv_batch)
            loss += chunk.loss
            stats += chunk.scalar_stats
            cos_target += chunk.cos_target
            torch.maximum(max_nontarget, chunk.max_nontarget, out=max_nontarget)
            grad_centres = centre_gradient(grad_cos, nearest, k)
            grad_x_hat += matmul(grad_centres, w_hat, options.precision)
            grad_w_hat = matmul(grad_centres.t(), x_hat, options.precision)
            radial = (grad_w_hat * w_hat).sum(dim=1, keepdim=True)
            grad_weight[rows] = ((grad_w_hat - w_hat * radial) / norm).to(weight.dtype)
        ctx.gradients = (grad_x_hat, grad_weight)
        ctx.mark_non_differentiable(stats, cos_target, max_nontarget)
        return loss, stats, cos_target, max_nontarget


def sface_block_chunked(
    x_hat: Tensor,
    weight: Tensor,
    local_labels: Tensor,
    inter_scale: Tensor | None,
    params: SFaceParams,
    options: BlockOptions,
    chunk_size: int = 0,
) -> BlockResult:
    """Chunked single-pass SFace block; ``chunk_size`` 0 picks one from a memory budget."""
    if chunk_size <= 0:
        k = options.sub_centers
        chunk_size = auto_chunk_size(x_hat.shape[0], weight.shape[0] // k, x_hat.shape[1], k)
    loss, stats, cos_target, max_nontarget = _ChunkedSFace.apply(
        x_hat, weight, local_labels, inter_scale, params, options, chunk_size
    )
    return BlockResult(loss, stats, cos_target, max_nontarget)
