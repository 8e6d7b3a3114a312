"""``sface_block_triton``: the SFace ``BlockFn`` on the Triton kernels of ``triton_sface.py``.

Torch keeps the O(B·D + C) parts: the inverse row norms of W, the B target pairs
(cosines in full precision, intra weights, their gradient terms) and the final
sums. The kernels do the O(B·C·D) work on the non-target pairs. Like
``_ChunkedSFace``, both gradients are computed in the forward pass and only
scaled in backward. Importing this module does not need Triton; calling the
block does (on CUDA, or on CPU with ``TRITON_INTERPRET=1``), and other inputs
(fp64, an empty block, CPU without the interpreter) go to ``sface_block_chunked``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from sface_dist.heads.precision import LOW_PRECISION_DTYPES
from sface_dist.heads.sface import (
    BlockOptions,
    BlockResult,
    GradientsInForward,
    SFaceParams,
    sface_block_chunked,
    sigmoid_weights,
    target_cosines,
)


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (an optional dependency; a broken install counts as absent)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors, in numpy (tests only: slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_inputs(x_hat: Tensor, weight: Tensor) -> None:
    """The kernels take fp32 operands on a CUDA device (on the CPU under ``TRITON_INTERPRET=1``); the head only
    calls them where ``impl_choice.choose_impl`` chose them, so anything else is a caller's mistake."""
    if not (x_hat.is_cuda or interpreter_enabled()):
        raise ValueError(f"the Triton SFace block needs CUDA tensors (got {x_hat.device}) or TRITON_INTERPRET=1")
    if x_hat.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"the Triton SFace block takes fp32 operands (got {x_hat.dtype} and {weight.dtype})")


@dataclass(frozen=True)
class TileConfig:
    """Tile shape shared by both kernels (the sparse liveness map is per [block_b x block_c] tile).

    ``splits``: class-tile ranges per row tile in the ∂x̂ kernel (0: enough programs to fill the GPU).
    """

    block_b: int = 64
    block_c: int = 32
    num_warps: int = 8
    num_stages: int = 2
    splits: int = 0

    @classmethod
    def parse(cls, text: str) -> TileConfig:
        """``BLOCK_BxBLOCK_CxWARPSxSTAGES``, e.g. ``64x32x8x2``, as the tools take it."""
        block_b, block_c, num_warps, num_stages = (int(n) for n in text.split("x"))
        return cls(block_b, block_c, num_warps, num_stages)

    @property
    def label(self) -> str:
        return f"{self.block_b}x{self.block_c}x{self.num_warps}x{self.num_stages}"


INTERPRETER_TILES = TileConfig(block_b=16, block_c=16, num_warps=1, num_stages=1, splits=2)
"""The smallest tiles ``tl.dot`` accepts: the interpreter's cost grows with tile area."""

CUDA_TILES = {
    "bf16": TileConfig(64, 32, num_warps=8, num_stages=2),
    "fp16": TileConfig(64, 32, num_warps=8, num_stages=2),
    "tf32": TileConfig(32, 16, num_warps=8, num_stages=2),
    "fp32": TileConfig(16, 16, num_warps=8, num_stages=2),
}
"""GPU tiles by operand precision, from compiling for sm_90 (``tools/compile_kernels.py``): 4-byte
operands double the shared memory, and 64 x 32 then asks 256 KiB for the ∂x̂ kernel in tf32, over the
227 KiB a Hopper block may have. docs/kernels.md has the table (registers, spills, shared memory)."""


def default_tiles(device: torch.device, precision: str) -> TileConfig:
    """The tiles ``sface_block_triton`` uses when none are given."""
    return INTERPRETER_TILES if device.type != "cuda" else CUDA_TILES[precision]


def _auto_splits(num_tiles_b: int, num_tiles_c: int, device: torch.device) -> int:
    """Class-tile ranges per row tile so that the ∂x̂ kernel has ~4 programs per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(num_tiles_c, math.ceil(4 * sms / num_tiles_b)))


_DOT_DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def kernel_constants(
    tiles: TileConfig, precision: str, dim: int, has_scale: bool, sparse: bool, emulate: bool
) -> dict[str, object]:
    """The compile-time arguments both kernels are launched with: constexprs and compiler options.

    FMA contraction is asked for explicitly: it is what the kernels were validated with, and Triton
    3.9 warns when a launch leaves it to a default that is about to change."""
    import triton
    import triton.language as tl

    return dict(
        BLOCK_B=tiles.block_b,
        BLOCK_C=tiles.block_c,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        HAS_SCALE=has_scale,
        SPARSE=sparse,
        DOT_DTYPE=getattr(tl, _DOT_DTYPES[precision]),
        INPUT_PRECISION="tf32" if precision == "tf32" and not emulate else "ieee",
        EMULATE=emulate,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        enable_fp_fusion=True,
    )


def _inter_gradients(
    x_hat: Tensor,
    weight: Tensor,
    inv_norm: Tensor,
    local_labels: Tensor,
    inter_scale: Tensor | None,
    params: SFaceParams,
    options: BlockOptions,
    skip_threshold: float,
    tiles: TileConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch both kernels on the non-target pairs.

    Returns ∂L/∂x̂ [B, D], ∂L/∂W [C, D], (Σ r_inter·scale·cos, Σ cos) over the pairs [2]
    and each row's largest non-target cosine [B].
    """
    import triton

    from sface_dist.heads.kernels.triton_sface import _grad_embedding_kernel, _grad_weight_kernel

    batch, dim = x_hat.shape
    num_classes = weight.shape[0]
    device = x_hat.device
    num_tiles_b = triton.cdiv(batch, tiles.block_b)
    num_tiles_c = triton.cdiv(num_classes, tiles.block_c)
    sparse = skip_threshold > 0.0
    constants = kernel_constants(
        tiles, options.precision, dim, inter_scale is not None, sparse, emulate=device.type != "cuda"
    )
    # x̂ is cast once (O(B·D)): every class tile re-reads it, so half the bytes is half the L2 traffic.
    x_operand = x_hat.to(LOW_PRECISION_DTYPES.get(options.precision, torch.float32))
    labels = local_labels.contiguous()
    scale = inter_scale.to(torch.float32).contiguous() if inter_scale is not None else inv_norm
    grad_scale = params.s * options.inv_batch
    grad_weight = torch.empty_like(weight)
    row_max = x_hat.new_full((batch,), -math.inf)
    sums = x_hat.new_empty((num_tiles_c, 2))
    live = torch.ones((num_tiles_b, num_tiles_c), dtype=torch.int8, device=device) if sparse else row_max
    _grad_weight_kernel[(num_tiles_c,)](
        x_operand, weight, inv_norm, labels, scale, grad_weight, row_max, sums, live,
        batch, num_classes, dim, num_tiles_b, params.k, params.b, grad_scale, skip_threshold,
        **constants,
    )
    splits = tiles.splits or _auto_splits(num_tiles_b, num_tiles_c, device)
    tiles_per_split = triton.cdiv(num_tiles_c, splits)
    grad_x_hat = torch.zeros_like(x_hat)
    _grad_embedding_kernel[(num_tiles_b, triton.cdiv(num_tiles_c, tiles_per_split))](
        x_operand, weight, inv_norm, labels, scale, live, grad_x_hat,
        batch, num_classes, dim, num_tiles_c, params.k, params.b, grad_scale, tiles_per_split,
        **constants,
    )
    return grad_x_hat, grad_weight, sums.sum(dim=0), row_max


class _TritonSFace(GradientsInForward):
    """Loss and gradients of one block from the Triton kernels plus the B target pairs in torch."""

    @staticmethod
    def forward(
        ctx,
        x_hat: Tensor,
        weight: Tensor,
        local_labels: Tensor,
        inter_scale: Tensor | None,
        params: SFaceParams,
        options: BlockOptions,
        skip_threshold: float,
        tiles: TileConfig,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x_hat = x_hat.detach().contiguous()
        weight = weight.detach().contiguous()
        batch, num_classes = x_hat.shape[0], weight.shape[0]
        inv_norm = weight.norm(dim=1).clamp_min(1e-12).reciprocal()
        grad_x_hat, grad_weight, inter_sums, max_nontarget = _inter_gradients(
            x_hat, weight, inv_norm, local_labels, inter_scale, params, options, skip_threshold, tiles
        )
        owned = local_labels >= 0
        target = local_labels.clamp_min(0)
        cos_target = target_cosines(x_hat, weight, local_labels)
        r_intra, _ = sigmoid_weights(cos_target, params)
        grad_target = torch.where(owned, -r_intra, 0.0) * (params.s * options.inv_batch)
        w_hat_target = weight[target] * inv_norm[target].unsqueeze(1)
        grad_x_hat += grad_target.unsqueeze(1) * w_hat_target
        radial_free = x_hat - w_hat_target * cos_target.unsqueeze(1)
        grad_weight.index_add_(0, target, (grad_target * inv_norm[target]).unsqueeze(1) * radial_free)
        intra_sum = (grad_target * cos_target).sum() / options.inv_batch
        inter_sum = inter_sums[0] * params.s
        num_owned = owned.sum().to(x_hat.dtype)
        stats = torch.stack([intra_sum, inter_sum, cos_target.sum(), inter_sums[1], batch * num_classes - num_owned])
        loss = (intra_sum + inter_sum) * options.inv_batch
        ctx.gradients = (grad_x_hat, grad_weight)
        ctx.mark_non_differentiable(stats, cos_target, max_nontarget)
        return loss, stats, cos_target, max_nontarget


def sface_block_triton(
    x_hat: Tensor,
    weight: Tensor,
    local_labels: Tensor,
    inter_scale: Tensor | None,
    params: SFaceParams,
    options: BlockOptions,
    skip_threshold: float = 0.0,
    tiles: TileConfig | None = None,
) -> BlockResult:
    """Fused SFace block (``BlockFn``); ``skip_threshold`` > 0 skips the gradient matmuls of tiles whose
    inter weights r_inter·inter_scale are all at or below it (docs/kernels.md: sparse mode)."""
    check_kernel_inputs(x_hat, weight)
    if options.sub_centers != 1:
        raise ValueError("head.impl=triton: the fused kernels score one centre a class; with head.sub_centers > 1 "
                         "use head.impl=chunked (auto picks it)")
    if weight.shape[0] == 0 or x_hat.shape[0] == 0:  # nothing to tile: the chunked block's empty sums
        return sface_block_chunked(x_hat, weight, local_labels, inter_scale, params, options)
    tiles = tiles or default_tiles(x_hat.device, options.precision)
    loss, stats, cos_target, max_nontarget = _TritonSFace.apply(
        x_hat, weight, local_labels, inter_scale, params, options, skip_threshold, tiles
    )
    return BlockResult(loss, stats, cos_target, max_nontarget)
