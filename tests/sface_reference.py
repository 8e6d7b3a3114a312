"""Independent fp64 reference of the SFace loss, written straight from DESIGN.md §3."""

from __future__ import annotations

import torch
from torch import Tensor


def sface_reference(
    embeddings: Tensor, weight: Tensor, labels: Tensor, s: float, k: float, a: float, b: float
) -> dict[str, Tensor]:
    """Loss and diagnostics of one process over all classes, computed in fp64."""
    x = embeddings.double()
    w = weight.double()
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    theta = torch.acos(cos.detach().clamp(-1.0, 1.0))
    r_intra = 1.0 / (1.0 + torch.exp(-k * (theta - a)))
    r_inter = 1.0 / (1.0 + torch.exp(k * (theta - b)))
    rows = torch.arange(x.shape[0])
    target = torch.zeros_like(cos, dtype=torch.bool)
    target[rows, labels] = True
    intra = -s * r_intra[rows, labels] * cos[rows, labels]
    inter = (s * r_inter * cos).masked_fill(target, 0.0).sum(dim=1)
    nontarget_cos = cos.detach().masked_fill(target, -2.0)
    return {
        "loss": intra.mean() + inter.mean(),
        "intra": intra.detach().mean(),
        "inter": inter.detach().mean(),
        "cos_target": cos.detach()[rows, labels].mean(),
        "cos_nontarget": cos.detach()[~target].mean(),
        "accuracy": (cos.detach()[rows, labels] > nontarget_cos.amax(dim=1)).double().mean(),
    }


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Norm-wise relative error ||actual - expected|| / ||expected||."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()
