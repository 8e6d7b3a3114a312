"""IJB-style sets of synthetic identities: loose crops placed by known similarities, which the 5-point alignment
must undo, and the meta files of ``IJB_release/<target>``."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from sface_dist.data.synthetic import SyntheticFaces
from sface_dist.evaluation.alignment import ARCFACE_TEMPLATE


def similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    angle = math.radians(degrees)
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[cos, -sin, shift[0]], [sin, cos, shift[1]]])


def placement(scale: float, degrees: float, centre: tuple[float, float]) -> np.ndarray:
    """The similarity that scales and rotates a 112x112 crop about its centre and puts it at ``centre``."""
    rotation = similarity(scale, degrees, (0.0, 0.0))
    return similarity(scale, degrees, tuple(np.asarray(centre) - apply(rotation, np.array([56.0, 56.0]))))


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def loose_crop(aligned: np.ndarray, matrix: np.ndarray, size: tuple[int, int], background: int) -> np.ndarray:
    """``aligned`` placed into a ``size`` (w, h) image by ``matrix`` (aligned -> loose coordinates)."""
    canvas = np.full((size[1], size[0], 3), background, dtype=np.uint8)
    return cv2.warpAffine(aligned, matrix, size, dst=canvas, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_TRANSPARENT)


def make_ijb_set(root: Path, target: str = "IJBC", identities: int = 5, seed: int = 0) -> None:
    """Synthetic identities laid out as ``IJB_release/<target>``: loose crops that need the 5-point alignment.

    Identity ``i`` has two templates; each holds two media (a photo, and a 'video' of two
    frames); every template pair is listed, genuine when the identities match.
    """
    rng = np.random.default_rng(seed)
    faces = SyntheticFaces(identities, seed=seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    prefix = target.lower()
    face_lines: list[str] = []
    landmark_lines: list[str] = []
    template_identity: dict[int, int] = {}
    template, media, image = 100, 5000, 1
    for identity in range(identities):
        for _ in range(2):
            template += 1
            template_identity[template] = identity
            for frames in (1, 2):
                media += 1
                for _ in range(frames):
                    aligned = faces.render(identity, image)
                    forward = placement(rng.uniform(1.1, 1.5), rng.uniform(-25, 25), tuple(rng.uniform(120, 140, 2)))
                    loose = loose_crop(aligned, forward, (260, 270), background=int(rng.integers(0, 255)))
                    name = f"{image}.jpg"
                    cv2.imwrite(str(root / "loose_crop" / name), loose[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                    points = " ".join(f"{v:.3f}" for v in apply(forward, ARCFACE_TEMPLATE).ravel())
                    face_lines.append(f"{name} {template} {media}")
                    landmark_lines.append(f"{name} {points} {rng.uniform(0.5, 1.0):.4f}")
                    image += 1
    ids = sorted(template_identity)
    pair_lines = [
        f"{a} {b} {int(template_identity[a] == template_identity[b])}"
        for i, a in enumerate(ids)
        for b in ids[i + 1 :]
    ]
    files = {"face_tid_mid": face_lines, "name_5pts_score": landmark_lines, "template_pair_label": pair_lines}
    for kind, lines in files.items():
        (root / "meta" / f"{prefix}_{kind}.txt").write_text("\n".join(lines) + "\n")
