"""Learnable synthetic face identities for the demo, the tests and the benchmarks.

Each identity is a random template: a face-like ellipse of its own shape and colour
carrying a handful of coloured blobs (eyes, mouth, marks) at identity-specific places.
A sample lays that template over a random smooth background, crops it with a random
shift, scale and aspect, then applies colour jitter and pixel noise: identities differ
in layout and colour, samples in framing, background and photometry, so a small CNN
separates a few hundred identities and its embedding transfers to unseen ones.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image

_CANVAS_SCALE = 1.4
"""Templates are drawn this much larger than the output so that every crop stays inside."""
_NUM_BLOBS = 6
_MAX_SHIFT = 0.08
"""Fraction of the image size."""
_SCALE_RANGE = (0.88, 1.12)
_MAX_ASPECT = 0.05
_NOISE_AMPLITUDE = 20
"""Uniform pixel noise in [-20, 20]: standard deviation ~12 grey levels."""


class SyntheticFaces:
    """Deterministic renderer of synthetic identities.

    ``render(identity, sample)`` depends only on ``(seed, identity, sample)``, so every
    process renders the same image. Identities at and beyond ``num_identities`` render
    too: held-out verification identities use ``num_identities, num_identities + 1, ...``.
    """

    def __init__(self, num_identities: int, image_size: int = 112, seed: int = 0) -> None:
        if num_identities < 1 or image_size < 8 or seed < 0:
            raise ValueError(
                f"SyntheticFaces needs num_identities >= 1, image_size >= 8 and seed >= 0, "
                f"got {num_identities}, {image_size}, {seed}"
            )
        self.num_identities = num_identities
        self.image_size = image_size
        self.seed = seed
        self._canvas = round(image_size * _CANVAS_SCALE)

    def render(self, identity: int, sample: int) -> np.ndarray:
        """One ``uint8 [image_size, image_size, 3]`` RGB image of ``identity``."""
        rng = np.random.default_rng((self.seed, 1, identity, sample))
        size, canvas = self.image_size, self._canvas
        face, mask = _template(self.seed, identity, canvas)
        scene = _smooth_field(rng, canvas)
        scene.paste(face, mask=mask)

        scale = rng.uniform(*_SCALE_RANGE) * (1.0 + rng.uniform(-_MAX_ASPECT, _MAX_ASPECT, size=2))
        half = size / (2.0 * scale)
        centre = canvas / 2.0 + rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, size=2) * size
        box = (centre[0] - half[0], centre[1] - half[1], centre[0] + half[0], centre[1] + half[1])
        crop = scene.resize((size, size), Image.Resampling.BILINEAR, box=box)

        gain = rng.uniform(0.7, 1.3) * rng.uniform(0.85, 1.15, size=(3, 1))
        offset = 127.5 + rng.uniform(-30.0, 30.0) + rng.uniform(-12.0, 12.0, size=(3, 1))
        jitter = np.clip((np.arange(256) - 127.5) * gain + offset, 0, 255).astype(np.uint8)
        pixels = np.asarray(crop.point(jitter.ravel().tolist()), dtype=np.int16)
        pixels += rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, size=pixels.shape, dtype=np.int16)
        return np.clip(pixels, 0, 255).astype(np.uint8)

    def render_pairs(self, identities: range, num_pairs: int, seed: int) -> tuple[list[np.ndarray], list[bool]]:
        """Verification pairs from ``identities``: half the same identity, half different.

        Returns the images in pair order (``a0, b0, a1, b1, ...``) and one flag per pair,
        the two kinds shuffled together; the draw depends only on the arguments.
        """
        if len(identities) < 2 or num_pairs < 2 or num_pairs % 2:
            raise ValueError(
                f"render_pairs needs >= 2 identities and an even num_pairs >= 2, got {len(identities)}, {num_pairs}"
            )
        rng = np.random.default_rng((self.seed, 2, seed))
        issame = [True] * (num_pairs // 2) + [False] * (num_pairs // 2)
        rng.shuffle(issame)
        images: list[np.ndarray] = []
        for pair, same in enumerate(issame):
            first = int(rng.integers(len(identities)))
            second = first if same else (first + int(rng.integers(1, len(identities)))) % len(identities)
            images += [self.render(identities[first], 2 * pair), self.render(identities[second], 2 * pair + 1)]
        return images, issame


def write_identity_folders(
    faces: SyntheticFaces,
    out_root: str | os.PathLike[str],
    num_images_per_identity: int,
    identities: range,
    suffix: str = ".png",
) -> list[Path]:
    """Save ``num_images_per_identity`` images per identity as ``out_root/<identity:06d>/<sample:04d><suffix>``.

    The suffix picks the format (PIL's names: ``.png``, ``.bmp``, ``.jpg``, ...). Zero-padded
    folder names sort in identity order, so ``folder_to_rec`` gives label ``i`` to the
    ``i``-th identity of ``identities``.
    """
    folders = []
    for identity in identities:
        folder = Path(out_root) / f"{identity:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for sample in range(num_images_per_identity):
            Image.fromarray(faces.render(identity, sample)).save(folder / f"{sample:04d}{suffix}", compress_level=1)
        folders.append(folder)
    return folders


@functools.lru_cache(maxsize=1024)
def _template(seed: int, identity: int, canvas: int) -> tuple[Image.Image, Image.Image]:
    """The noise-free face of ``identity`` on a ``canvas x canvas`` grid: RGB image and its mask.

    Cached per process (1024 identities, ~100 KB each at 112 pixels).
    """
    rng = np.random.default_rng((seed, 0, identity))
    coords = (np.arange(canvas, dtype=np.float32) + 0.5 - canvas / 2) * (_CANVAS_SCALE / canvas)
    y, x = coords[:, None], coords[None, :]  # in output-image widths, 0 at the centre
    centre = rng.uniform(-0.05, 0.05, size=2).astype(np.float32)
    radii = rng.uniform(0.27, 0.37, size=2).astype(np.float32)
    radius = np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2)
    mask = np.clip((1.0 - radius) * 20.0 * 255.0, 0.0, 255.0).astype(np.uint8)

    image = np.asarray(_smooth_field(rng, canvas, grid=2), dtype=np.float32) * 0.4
    image += rng.uniform(40, 220, size=3).astype(np.float32) * 0.6
    for _ in range(_NUM_BLOBS):
        blob_centre = (centre + rng.uniform(-0.75, 0.75, size=2) * radii).astype(np.float32)
        blob_radii = rng.uniform(0.03, 0.09, size=2).astype(np.float32)
        weight = np.exp(-(((x - blob_centre[0]) / blob_radii[0]) ** 2 + ((y - blob_centre[1]) / blob_radii[1]) ** 2))
        image += weight[..., None] * (rng.uniform(0, 255, size=3).astype(np.float32) - image)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), Image.fromarray(mask)


def _smooth_field(rng: np.random.Generator, size: int, grid: int = 3) -> Image.Image:
    """A random low-frequency RGB colour field of ``size x size`` pixels."""
    coarse = Image.fromarray(rng.integers(0, 256, size=(grid, grid, 3), dtype=np.uint8))
    return coarse.resize((size, size), Image.Resampling.BILINEAR)
