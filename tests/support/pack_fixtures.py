"""Encoded face-crop stand-ins for the verification-pack tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_image(seed: int, size: tuple[int, int] = (112, 112), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()
