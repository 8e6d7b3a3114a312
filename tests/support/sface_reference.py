"""Independent fp64 references of the heads, written straight from the formulas (docs/design.md, The SFace loss)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _cosines(embeddings: Tensor, weight: Tensor, sub_centers: int = 1) -> Tensor:
    """[B, C] cosines; with sub-centres ``weight`` is [C·K, D], class-major, and a class's cosine the largest of
    its K (sub-center ArcFace's definition)."""
    x = embeddings.double()
    w = weight.double()
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    return cos.view(cos.shape[0], -1, sub_centers).amax(dim=2)


def sface_reference(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    s: float,
    k: float,
    a: float,
    b: float,
    inter_scale: Tensor | None = None,
    sub_centers: int = 1,
) -> dict[str, Tensor]:
    """Loss and diagnostics of one process over all classes of ``weight``, computed in fp64.

    ``inter_scale`` [C] multiplies each class's inter term (Partial-FC correction). With ``sub_centers`` K the
    class cosine is the largest over the class's K centres, in the intra term (the target's nearest centre) and
    in every inter term (each other class's nearest centre).
    """
    cos = _cosines(embeddings, weight, sub_centers)
    theta = torch.acos(cos.detach().clamp(-1.0, 1.0))
    r_intra = 1.0 / (1.0 + torch.exp(-k * (theta - a)))
    r_inter = 1.0 / (1.0 + torch.exp(k * (theta - b)))
    if inter_scale is not None:
        r_inter = r_inter * inter_scale.double()
    rows = torch.arange(cos.shape[0])
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


def margin_reference(
    embeddings: Tensor, weight: Tensor, labels: Tensor, s: float, m1: float, m2: float, m3: float,
    margin_grad: str = "cos", class_weight: Tensor | None = None, sub_centers: int = 1,
) -> dict[str, Tensor]:
    """Cross-entropy with target logit s·(cos(m1·θ + m2) - m3) (ArcFace / CosFace / combined), fp64.

    ``margin_grad="cos"``: the target logit's gradient is that of s·cos θ (insightface); ``"exact"``: its own.
    ``class_weight`` [C] multiplies each class's exponential in the softmax (Partial-FC correction). ``accuracy``
    is the plain top-1 of the cosines, as for SFace: the margin is the loss's, not the prediction's.
    """
    cos = _cosines(embeddings, weight, sub_centers).clamp(-1.0, 1.0)
    rows = torch.arange(cos.shape[0])
    target_cos = cos[rows, labels]
    theta = torch.acos(target_cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
    margined = torch.cos(m1 * theta + m2) - m3
    if m1 == 1.0 and m2 > 0.0:
        margined = torch.where(theta + m2 < math.pi, margined, target_cos - m2 * math.sin(m2) - m3)
    elif m1 == 1.0 and m2 == 0.0:
        margined = target_cos - m3
    if margin_grad == "cos":
        margined = target_cos + (margined - target_cos).detach()
    target = F.one_hot(labels, cos.shape[1]).bool()
    logits = s * torch.where(target, margined.unsqueeze(1), cos)
    if class_weight is not None:
        logits = logits + class_weight.double().log()
    return {
        "loss": F.cross_entropy(logits, labels),
        "cos_target": target_cos.detach().mean(),
        "cos_nontarget": cos.detach()[~target].mean(),
        "accuracy": (target_cos > cos.masked_fill(target, -math.inf).amax(1)).double().mean(),
    }


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Norm-wise relative error ||actual - expected|| / ||expected||."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()
