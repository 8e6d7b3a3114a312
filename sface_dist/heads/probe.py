"""Head inputs with a chosen cosine distribution, for precision measurements, kernel tests and benchmarks.

Random Gaussian embeddings are all near-orthogonal to every centre, which hides
the errors that matter: mid-training, targets sit near θ = a where the intra
sigmoid is steepest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def embeddings_at_cosine(
    batch: int,
    num_classes: int,
    dim: int,
    cos_target: float,
    spread: float = 0.08,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """(embeddings [B, D], weight [C, D], labels [B]) with cos θ_y ≈ cos_target ± spread, on ``device``.

    Centres are random unit vectors (scaled by 3), each embedding is its centre
    rotated towards a random orthogonal direction (scaled by 10), so non-target
    cosines stay near 0 with spread ~1/sqrt(D). The draws come from a generator
    on ``device`` (large shapes are drawn where they are used), so each device
    has its own tensors for a seed.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=gen, device=device), dim=1)
    labels = torch.randint(0, num_classes, (batch,), generator=gen, device=device)
    noise = torch.randn(batch, dim, generator=gen, device=device)
    target = centres[labels]
    noise = F.normalize(noise - (noise * target).sum(1, keepdim=True) * target, dim=1)
    cos = (cos_target + spread * torch.randn(batch, 1, generator=gen, device=device)).clamp(-1.0, 1.0)
    embeddings = cos * target + (1.0 - cos**2).sqrt() * noise
    return embeddings * 10.0, centres * 3.0, labels
