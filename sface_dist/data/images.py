"""Encoded image bytes: recognise, measure, decode to RGB arrays, encode as JPEG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything without it
    simplejpeg = None

_SIGNATURES = {b"\xff\xd8\xff": ".jpg", b"\x89PNG\r\n\x1a\n": ".png", b"BM": ".bmp"}


def image_extension(encoded: bytes) -> str:
    """File extension of an encoded JPEG, PNG or BMP image, from its signature ('' when unrecognised)."""
    for signature, extension in _SIGNATURES.items():
        if encoded.startswith(signature):
            return extension
    return ""


def image_shape(encoded: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of an encoded image, read from its header; None when PIL cannot open it."""
    try:
        with Image.open(io.BytesIO(encoded)) as opened:
            return opened.height, opened.width
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def decode_rgb(encoded: bytes) -> np.ndarray:
    """An encoded image as ``uint8 [H, W, 3]`` RGB.

    JPEGs go through simplejpeg where it is installed (the same libjpeg-turbo output as PIL,
    ~1.5x faster); anything else, and whatever simplejpeg rejects, through PIL, whose
    exception (``OSError``/``ValueError``) then says what is wrong.
    """
    if simplejpeg is not None and encoded[:3] == b"\xff\xd8\xff":
        try:
            return simplejpeg.decode_jpeg(encoded, colorspace="RGB")
        except ValueError:
            pass
    with Image.open(io.BytesIO(encoded)) as image:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def encode_jpeg(image: np.ndarray | Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes of an RGB image (``uint8 [H, W, 3]`` array or PIL image)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
