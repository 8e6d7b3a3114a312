"""Triton kernels of the SFace block: cosines, sigmoid weights, loss and both gradients, tile by tile.

With G = ∂L/∂cos known as soon as a cosine is (docs/design.md, The SFace loss), two kernels cover
the non-target pairs of a block without ever holding a [B, C] tensor:

* ``_grad_weight_kernel`` — one program per class tile, walking every row tile:
  cos = x̂·W^T/||w|| -> r_inter -> G, accumulates G^T·x̂ for its classes in
  registers and writes ∂L/∂W through the row normalisation,
  (g - ŵ(ŵ·g))/||w||. It also produces the inter loss and cosine sums of its
  class tile, each row's largest non-target cosine (``atomic_max``) and, in
  sparse mode, one liveness flag per [row tile x class tile].
* ``_grad_embedding_kernel`` — one program per (row tile, range of class tiles):
  recomputes cos -> G and accumulates G·ŵ for its rows, added into ∂L/∂x̂ with
  one ``atomic_add`` per program. In sparse mode it skips the dead tiles that
  the first kernel flagged, so the cos recompute is skipped as well.

Target pairs (B of them) are left to torch: their cosines are taken in full
precision (``target_cosines``) and their gradient terms added with index ops.
Matmul operands are fp32 (IEEE or TF32), bf16 or fp16 with fp32 accumulation;
the weights, G and all sums are fp32. docs/kernels.md has the design numbers.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _acos(x):
    """acos of x clamped to [-1, 1] (fp32) by Abramowitz & Stegun 4.4.46, sqrt(1-|x|)·Σ a_i |x|^i with
    |error| <= 2e-8 rad: no libdevice, so one code path for every Triton version and the interpreter."""
    x = tl.minimum(tl.maximum(x, -1.0), 1.0)
    ax = tl.abs(x)
    poly = -0.0012624911
    poly = poly * ax + 0.0066700901
    poly = poly * ax - 0.0170881256
    poly = poly * ax + 0.0308918810
    poly = poly * ax - 0.0501743046
    poly = poly * ax + 0.0889789874
    poly = poly * ax - 0.2145988016
    poly = poly * ax + 1.5707963050
    positive = tl.sqrt(1.0 - ax) * poly
    return tl.where(x >= 0.0, positive, 3.141592653589793 - positive)


@triton.jit
def _operand(x, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """A tile (fp32, or already in DOT_DTYPE) as a matmul operand. Under the interpreter (EMULATE)
    low-precision operands are rounded to nearest-even and kept in fp32: its bf16 dot and cast are
    not IEEE."""
    if DOT_DTYPE == tl.float32:
        return x
    elif x.dtype == DOT_DTYPE:
        if EMULATE:
            return x.to(tl.float32)
        else:
            return x
    elif EMULATE:
        if DOT_DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(DOT_DTYPE).to(tl.float32)
    else:
        return x.to(DOT_DTYPE)


@triton.jit
def _inter_weights(
    x_op, w_op, inv_norm, scale, rows, cols, labels, num_rows, num_classes, k, b,
    INPUT_PRECISION: tl.constexpr,
):
    """Cosines [BB, BC] of a tile and their inter weights r_inter·inter_scale (0 on targets and padding)."""
    cos = tl.dot(x_op, tl.trans(w_op), input_precision=INPUT_PRECISION) * inv_norm[None, :]
    pair = (rows[:, None] < num_rows) & (cols[None, :] < num_classes) & (labels[:, None] != cols[None, :])
    theta = _acos(cos)
    weights = tl.where(pair, tl.sigmoid(k * (b - theta)) * scale[None, :], 0.0)
    return cos, pair, weights


@triton.jit
def _grad_weight_kernel(
    x_ptr, w_ptr, inv_norm_ptr, labels_ptr, scale_ptr,
    grad_w_ptr, row_max_ptr, sums_ptr, live_ptr,
    num_rows, num_classes, dim, num_tiles_b, k, b, grad_scale, skip_threshold,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SCALE: tl.constexpr, SPARSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    """One class tile: ∂L/∂W rows, inter sums, row maxima and tile liveness (see module docstring)."""
    tile_c = tl.program_id(0)
    num_tiles_c = tl.num_programs(0)
    cols = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < num_classes
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    w_offsets = cols[:, None] * dim + d[None, :]
    w_mask = col_ok[:, None] & d_ok[None, :]
    w_op = _operand(tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0), DOT_DTYPE, EMULATE)
    inv_norm = tl.load(inv_norm_ptr + cols, mask=col_ok, other=0.0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    else:
        scale = tl.full((BLOCK_C,), 1.0, tl.float32)
    grad_w_hat_t = tl.zeros((BLOCK_D, BLOCK_C), dtype=tl.float32)
    inter_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    cos_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile_b in range(0, num_tiles_b):
        rows = tile_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < num_rows
        x = tl.load(x_ptr + rows[:, None] * dim + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        x_op = _operand(x, DOT_DTYPE, EMULATE)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        cos, pair, weights = _inter_weights(
            x_op, w_op, inv_norm, scale, rows, cols, labels, num_rows, num_classes, k, b, INPUT_PRECISION
        )
        inter_sum += tl.sum(weights * cos, axis=0)
        cos_sum += tl.sum(tl.where(pair, cos, 0.0), axis=0)
        tl.atomic_max(row_max_ptr + rows, tl.max(tl.where(pair, cos, float("-inf")), axis=1), mask=row_ok)
        grad_cos = _operand(weights * grad_scale, DOT_DTYPE, EMULATE)
        if SPARSE:
            live = tl.max(tl.max(weights, axis=1), axis=0) > skip_threshold
            tl.store(live_ptr + tile_b * num_tiles_c + tile_c, live.to(tl.int8))
            if live:
                grad_w_hat_t += tl.dot(tl.trans(x_op), grad_cos, input_precision=INPUT_PRECISION)
        else:
            grad_w_hat_t += tl.dot(tl.trans(x_op), grad_cos, input_precision=INPUT_PRECISION)
    grad_w_hat = tl.trans(grad_w_hat_t)
    w_hat = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0) * inv_norm[:, None]
    radial = tl.sum(grad_w_hat * w_hat, axis=1)
    grad_w = (grad_w_hat - w_hat * radial[:, None]) * inv_norm[:, None]
    tl.store(grad_w_ptr + w_offsets, grad_w, mask=w_mask)
    tl.store(sums_ptr + tile_c * 2, tl.sum(inter_sum, axis=0))
    tl.store(sums_ptr + tile_c * 2 + 1, tl.sum(cos_sum, axis=0))


@triton.jit
def _grad_embedding_kernel(
    x_ptr, w_ptr, inv_norm_ptr, labels_ptr, scale_ptr, live_ptr, grad_x_ptr,
    num_rows, num_classes, dim, num_tiles_c, k, b, grad_scale, tiles_per_split,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SCALE: tl.constexpr, SPARSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    """One row tile over one range of class tiles: adds Σ_j G_ij ŵ_j into ∂L/∂x̂ (see module docstring)."""
    tile_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = tile_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < num_rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    x = tl.load(x_ptr + rows[:, None] * dim + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    x_op = _operand(x, DOT_DTYPE, EMULATE)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    grad_x = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for step in range(0, tiles_per_split):
        tile_c = split * tiles_per_split + step
        in_range = tile_c < num_tiles_c
        if SPARSE:
            live = tl.load(live_ptr + tile_b * num_tiles_c + tile_c, mask=in_range, other=0) != 0
        else:
            live = in_range
        if live:
            cols = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
            col_ok = cols < num_classes
            w = tl.load(w_ptr + cols[:, None] * dim + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            w_op = _operand(w, DOT_DTYPE, EMULATE)
            inv_norm = tl.load(inv_norm_ptr + cols, mask=col_ok, other=0.0)
            if HAS_SCALE:
                scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
            else:
                scale = tl.full((BLOCK_C,), 1.0, tl.float32)
            _, _, weights = _inter_weights(
                x_op, w_op, inv_norm, scale, rows, cols, labels, num_rows, num_classes, k, b, INPUT_PRECISION
            )
            grad_cos = _operand(weights * (grad_scale * inv_norm[None, :]), DOT_DTYPE, EMULATE)
            grad_x += tl.dot(grad_cos, w_op, input_precision=INPUT_PRECISION)
    tl.atomic_add(grad_x_ptr + rows[:, None] * dim + d[None, :], grad_x, mask=row_ok[:, None] & d_ok[None, :])
