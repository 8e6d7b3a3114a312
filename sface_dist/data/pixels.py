"""The pixel normalisation of every model input: 0-255 RGB to ``[-1, 1]`` as ``(x - 127.5) / 127.5``.

insightface's mapping. The loaders (torch and DALI), the embedders, the ONNX graph and the
benchmarks all take it from here, so training and evaluation feed a model the same float32 bits.
"""

from __future__ import annotations

import torch

PIXEL_MEAN = 127.5
"""Subtracted from every 0-255 channel value."""
PIXEL_STD = 127.5
"""What the centred value is divided by (DALI's ``std``); a division, not a multiplication by its inverse,
which would round differently."""


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255 float) pixels of any layout as float32 ``(x - PIXEL_MEAN) / PIXEL_STD``."""
    return (images.float() - PIXEL_MEAN) / PIXEL_STD
