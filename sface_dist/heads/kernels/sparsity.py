"""How sparse SFace's gradient is: the live-pair fraction of a block and its spread over tiles.

A non-target pair is *live* when its inter weight r_inter(θ)·inter_scale exceeds a
threshold; a [block_b x block_c] tile is live when any of its pairs is. Sparse mode of
the Triton kernels (``skip_threshold``) skips the gradient matmuls of dead tiles, so the
live-tile fraction is the share of the gradient matmul work that remains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sface_dist.heads.sface import SFaceParams, sigmoid_weights


@dataclass(frozen=True)
class LivePairs:
    """Live pairs and tiles of one block at one threshold."""

    threshold: float
    pair_fraction: float
    """Live non-target pairs / all non-target pairs."""
    tile_fraction: float
    """Tiles with at least one live pair / all tiles (the gradient matmul work sparse mode keeps)."""
    tile_quantiles: tuple[float, float, float, float]
    """Live-pair fraction within a tile at the 50th, 90th, 99th percentile and the maximum."""


def live_pairs(
    x_hat: Tensor,
    weight: Tensor,
    local_labels: Tensor,
    params: SFaceParams,
    threshold: float,
    block_b: int = 64,
    block_c: int = 32,
    chunk_tiles: int = 256,
) -> LivePairs:
    """Count live pairs of ``x_hat`` [B, D] against raw ``weight`` [C, D], ``chunk_tiles`` class tiles at a time."""
    batch, num_classes = x_hat.shape[0], weight.shape[0]
    pad_b = -batch % block_b
    per_tile: list[Tensor] = []
    live_total = 0
    chunk = block_c * chunk_tiles
    for start in range(0, num_classes, chunk):
        w_hat = F.normalize(weight[start : start + chunk].float(), dim=1)
        cos = x_hat.float() @ w_hat.t()
        _, r_inter = sigmoid_weights(cos, params)
        columns = torch.arange(start, start + w_hat.shape[0], device=cos.device)
        live = (r_inter > threshold) & (local_labels.unsqueeze(1) != columns.unsqueeze(0))
        live_total += int(live.sum())
        live = F.pad(live.float(), (0, -w_hat.shape[0] % block_c, 0, pad_b))
        tiles = live.reshape(live.shape[0] // block_b, block_b, live.shape[1] // block_c, block_c)
        per_tile.append(tiles.sum(dim=(1, 3)).flatten())
    counts = torch.cat(per_tile)
    fractions = counts / (block_b * block_c)
    quantiles = torch.quantile(fractions, torch.tensor([0.5, 0.9, 0.99], device=fractions.device)).tolist()
    num_targets = int((local_labels >= 0).sum())
    return LivePairs(
        threshold=threshold,
        pair_fraction=live_total / max(1, batch * num_classes - num_targets),
        tile_fraction=float((counts > 0).float().mean()),
        tile_quantiles=(quantiles[0], quantiles[1], quantiles[2], float(fractions.max())),
    )
