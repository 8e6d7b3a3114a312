"""A backbone's size and cost: parameters, and multiply-accumulates of one forward at the input size.

Counted on the ``meta`` device (no memory, no arithmetic) by ``torch.utils.flop_counter``, which counts the
convolutions and matrix products; normalisation, activations and additions are left out, as the FLOPs tables
of face backbones leave them out. Those tables' "FLOPs" are multiply-accumulates (insightface's iresnet50:
6.3 G); one multiply-accumulate is two floating-point operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sface_dist.backbones.registry import build_backbone


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int
    """Multiply-accumulates of one image's forward."""


def count_macs(module: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-accumulates of ``module(inputs)`` (``inputs`` may be on the ``meta`` device)."""
    with FlopCounterMode(display=False) as counter:
        module(inputs)
    return counter.get_total_flops() // 2


def measure(name: str, embedding_size: int = 512, image_size: int = 112) -> Complexity:
    """``name``'s parameters and per-image multiply-accumulates at ``image_size`` x ``image_size``."""
    with torch.device("meta"):
        model = build_backbone(name, embedding_size).eval()
        image = torch.empty(1, 3, image_size, image_size)
    return Complexity(sum(param.numel() for param in model.parameters()), count_macs(model, image))
