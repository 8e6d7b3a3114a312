"""The per-image augmentations of ``Sample`` applied with PIL (the torch and synthetic backends).

The DALI backend applies the same parameters with its own operators (``dali.py``); the
two agree in kind (same probabilities and ranges, drawn by the sampler), not to the bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from sface_dist.data.sampler import Sample


def augment(pixels: np.ndarray, sample: Sample) -> np.ndarray:
    """``pixels`` (``uint8 [H, W, 3]`` RGB) downscaled, blurred, colour-jittered and flipped as ``sample`` says."""
    if sample.augmented:
        image = Image.fromarray(pixels)
        if sample.downscale:
            size = image.size
            image = image.resize((sample.downscale, sample.downscale), Image.Resampling.BILINEAR)
            image = image.resize(size, Image.Resampling.BILINEAR)
        if sample.blur_sigma:
            image = image.filter(ImageFilter.GaussianBlur(radius=sample.blur_sigma))
        if sample.hue or sample.saturation != 1.0:
            image = _jitter_hsv(image, sample.hue, sample.saturation)
        pixels = np.asarray(image)
    return pixels[:, ::-1] if sample.flip else pixels


def _jitter_hsv(image: Image.Image, hue: float, saturation: float) -> Image.Image:
    """Rotate the hue by ``hue`` degrees and scale the saturation by ``saturation``."""
    hsv = np.asarray(image.convert("HSV"), dtype=np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + hue * 256.0 / 360.0, 256.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0.0, 255.0)
    channels = (np.rint(hsv).astype(np.int32) % 256).astype(np.uint8)
    return Image.frombytes("HSV", image.size, channels.tobytes()).convert("RGB")
