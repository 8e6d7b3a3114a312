"""5-point face alignment to the 112x112 ArcFace template (as insightface's IJB and OpenCV's SFace do).

The landmarks (left eye, right eye, nose tip, left and right mouth corners, in image
left-to-right order) are mapped onto the template by the least-squares similarity
transform (rotation, uniform scale, translation: Umeyama's estimate, which in 2-D is
the complex ratio below), and the image is resampled with OpenCV's bilinear
``warpAffine``, zeros outside, exactly as insightface prepares IJB faces.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
"""Landmark positions in a 112x112 aligned crop (insightface's ``arcface_dst``)."""


def import_cv2() -> ModuleType:
    """OpenCV, or an error saying how to install it (it is an optional dependency)."""
    try:
        import cv2
    except ImportError:
        raise ImportError("face alignment needs OpenCV: pip install 'sface_dist[export]'") from None
    return cv2


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the similarity that maps ``source`` points ``[K, 2]`` closest to ``target``.

    With points as complex numbers ``z`` (source) and ``w`` (target), centred, the
    least-squares ``w ~ a z`` has ``a = sum(conj(z) w) / sum(|z|^2)``: ``|a|`` is the scale
    and ``arg(a)`` the rotation; no reflection is allowed.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"need matching [K >= 2, 2] point sets, got {source.shape} and {target.shape}")
    z = source[:, 0] + 1j * source[:, 1]
    w = target[:, 0] + 1j * target[:, 1]
    z_mean, w_mean = z.mean(), w.mean()
    spread = np.sum(np.abs(z - z_mean) ** 2)
    if spread <= 1e-12:
        raise ValueError("source points coincide: no similarity transform")
    a = np.sum(np.conj(z - z_mean) * (w - w_mean)) / spread
    shift = w_mean - a * z_mean
    return np.array([[a.real, -a.imag, shift.real], [a.imag, a.real, shift.imag]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size x size`` aligned crop of ``image`` (``[H, W, 3]`` uint8, any channel order)."""
    if size % 112:
        raise ValueError(f"the ArcFace template is defined for multiples of 112 pixels, got {size}")
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if landmarks.shape != (5, 2):
        raise ValueError(f"need 5 landmarks (10 numbers), got {landmarks.size} numbers")
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / 112))
    return import_cv2().warpAffine(image, matrix, (size, size), borderValue=0.0)
