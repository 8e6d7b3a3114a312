"""The weights and inputs of the insightface golden files, rebuilt from names alone (no insightface code)."""

from __future__ import annotations

import zlib

import torch


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def filled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the same names, shapes and dtypes, each tensor drawn from a generator seeded by its name,
    at scales that keep a deep residual network's activations near unit size and its output led by the input:
    convolutions and linears at 1/sqrt(fan-in), batch norms near the identity but the one closing each residual
    branch (``bn3``) near 0.2, so that a hundred blocks add up without blowing up; PReLU slopes near 0.25."""
    out = {}
    for name, tensor in state.items():
        gen = _generator(name)
        shape = tensor.shape
        if not tensor.is_floating_point():
            out[name] = torch.zeros_like(tensor)
        elif name.endswith("running_var"):
            out[name] = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("running_mean") or name.endswith("bias"):
            out[name] = 0.02 * torch.randn(shape, generator=gen)
        elif tensor.dim() == 1:  # batch-norm and PReLU weights
            prelu = "prelu" in name or (name.endswith(".2.weight") and "layers" in name)
            centre = 0.25 if prelu else 0.2 if name.endswith("bn3.weight") else 1.0
            out[name] = centre + 0.05 * torch.randn(shape, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen) / tensor[0].numel() ** 0.5
    return out


def inputs() -> torch.Tensor:
    """Two 112x112 RGB faces' worth of normalised pixels."""
    return torch.randn((2, 3, 112, 112), generator=_generator("inputs")).clamp(-1.0, 1.0)
