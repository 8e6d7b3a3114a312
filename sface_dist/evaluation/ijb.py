"""IJB-B / IJB-C 1:1 template verification, scored as insightface's ``eval_ijbc.py`` scores it.

Standard layout of ``IJB_release/IJBC`` (IJB-B: ``IJBB`` and ``ijbb_`` files)::

    meta/ijbc_face_tid_mid.txt          <image> <template id> <media id>          one line per face
    meta/ijbc_name_5pts_score.txt       <image> x1 y1 ... x5 y5 <faceness score>  same faces, same order
    meta/ijbc_template_pair_label.txt   <template 1> <template 2> <1 same | 0 different>
    loose_crop/<image>

Each face is aligned from its 5 landmarks (``alignment.align_face``) and embedded
with its mirror. The image feature is the sum of the two views (flip test), scaled by
the detector's faceness score; images of one media (video) are averaged, the media
of a template summed, the template feature L2-normalised; a pair's score is the cosine
of its two templates. These are insightface's defaults (its F1, N1, D1 modes).

TAR@FAR is read two ways (``evaluation.roc``): the primary "FAR <= target", and the
"nearest ROC point" that insightface's script, and so its published tables, report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sface_dist.evaluation.alignment import align_face, import_cv2
from sface_dist.evaluation.roc import (
    IJB_FARS,
    OperatingPoint,
    RocCurve,
    nearest_operating_points,
    operating_points,
    roc_curve,
    save_roc_plot,
)

TARGETS = ("IJBB", "IJBC")
_MAX_LISTED = 5
READINGS: dict[str, str] = {
    "tar_at_far": "TAR@FAR (FAR <= target): the highest TAR among thresholds whose FAR does not exceed the target",
    "tar_at_far_nearest": (
        "TAR@FAR (nearest ROC point, as insightface's tables): the point of scikit-learn's roc_curve "
        "whose FAR is nearest the target, which may exceed it"
    ),
}
"""The two TAR@FAR readings by their JSON key, with what each means."""


class IjbError(ValueError):
    """IJB meta files or images that cannot be evaluated as they are, named with the reason."""


@dataclass(frozen=True)
class IjbProtocol:
    """The faces and template pairs of one IJB set; arrays are indexed by face (``N``) or pair (``P``)."""

    root: Path
    target: str
    image_names: list[str]
    landmarks: np.ndarray
    """float32 ``[N, 5, 2]``, pixel coordinates in the loose crop."""
    faceness: np.ndarray
    """float32 ``[N]``, the detector's score."""
    templates: np.ndarray
    medias: np.ndarray
    template_pairs: np.ndarray
    """int64 ``[P, 2]``."""
    labels: np.ndarray
    """bool ``[P]``, True for the same identity."""

    def image_path(self, index: int) -> Path:
        return self.root / "loose_crop" / self.image_names[index]

    @property
    def faces_key(self) -> str:
        """A short hash of what decides the aligned faces (the folder, the image names and their landmarks): an
        embedding cache built for other faces has another key."""
        digest = hashlib.sha1(str(self.root.resolve()).encode())
        digest.update("\n".join(self.image_names).encode())
        digest.update(np.ascontiguousarray(self.landmarks, dtype=np.float32).tobytes())
        return digest.hexdigest()[:12]

    def load_aligned(self, index: int) -> np.ndarray:
        """Face ``index`` aligned to 112x112, as uint8 RGB ``[3, 112, 112]``."""
        cv2 = import_cv2()
        path = self.image_path(index)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise IjbError(f"{path}: cannot read image")
        aligned = align_face(image, self.landmarks[index])
        return np.ascontiguousarray(aligned[:, :, ::-1].transpose(2, 0, 1))


def meta_path(root: Path, target: str, kind: str) -> Path:
    """``root/meta/<target>_<kind>.txt`` with ``kind`` one of face_tid_mid, name_5pts_score, template_pair_label."""
    return root / "meta" / f"{target.lower()}_{kind}.txt"


def detect_target(root: str | os.PathLike[str]) -> str:
    """IJBB or IJBC, from which meta files ``root`` holds."""
    root = Path(root)
    found = [target for target in TARGETS if meta_path(root, target, "face_tid_mid").is_file()]
    if len(found) != 1:
        expected = " or ".join(str(meta_path(root, target, "face_tid_mid")) for target in TARGETS)
        problem = "both IJB-B and IJB-C meta files" if found else "no IJB meta files"
        raise IjbError(f"{root}: {problem} (expected {expected}); pass the target explicitly")
    return found[0]


def read_ijb(root: str | os.PathLike[str], target: str | None = None) -> IjbProtocol:
    """Read and cross-check the meta files of ``root``; every listed image must exist in ``loose_crop/``."""
    root = Path(root)
    target = (target or detect_target(root)).upper()
    if target not in TARGETS:
        raise IjbError(f"unknown IJB target {target!r}; known: {', '.join(TARGETS)}")
    faces_file = meta_path(root, target, "face_tid_mid")
    landmarks_file = meta_path(root, target, "name_5pts_score")
    pairs_file = meta_path(root, target, "template_pair_label")
    face_names, face_ids = _read_named_rows(faces_file, 2, "<image> <template id> <media id>")
    names, points = _read_named_rows(landmarks_file, 11, "<image> x1 y1 ... x5 y5 <faceness score>")
    if face_names != names:
        first_difference = next(
            (i for i, (a, b) in enumerate(zip(face_names, names)) if a != b), min(len(face_names), len(names))
        )
        raise IjbError(
            f"{landmarks_file}: lists {len(names)} faces, {faces_file.name} {len(face_names)}; they must name the "
            f"same images in the same order, and differ first at line {first_difference + 1}"
        )
    pairs = _read_int_rows(pairs_file, 3, "<template 1> <template 2> <label>")
    if not np.isin(pairs[:, 2], (0, 1)).all():
        line = int(np.flatnonzero(~np.isin(pairs[:, 2], (0, 1)))[0]) + 1
        raise IjbError(f"{pairs_file}:{line}: label must be 0 or 1, got {pairs[line - 1, 2]}")
    templates = face_ids[:, 0].astype(np.int64)
    unknown = np.setdiff1d(pairs[:, :2], templates)
    if unknown.size:
        raise IjbError(
            f"{pairs_file}: {unknown.size} template ids have no face in {faces_file.name}: "
            + ", ".join(str(t) for t in unknown[:_MAX_LISTED].tolist())
        )
    _check_images(root, landmarks_file, names)
    return IjbProtocol(
        root=root,
        target=target,
        image_names=names,
        landmarks=points[:, :10].reshape(-1, 5, 2).astype(np.float32),
        faceness=points[:, 10].astype(np.float32),
        templates=templates,
        medias=face_ids[:, 1].astype(np.int64),
        template_pairs=pairs[:, :2].copy(),
        labels=pairs[:, 2] == 1,
    )


def _read_named_rows(path: Path, num_values: int, layout: str) -> tuple[list[str], np.ndarray]:
    """Lines ``<name> <num_values finite numbers>``: the names and a float64 ``[lines, num_values]`` array."""
    names, values = [], []
    for number, line in _numbered_lines(path):
        fields = line.split()
        try:
            if len(fields) != num_values + 1:
                raise ValueError
            row = [float(field) for field in fields[1:]]
        except ValueError:
            raise IjbError(f"{path}:{number}: expected '{layout}', got {line[:120]!r}") from None
        if not all(math.isfinite(value) for value in row):
            raise IjbError(f"{path}:{number}: a value is not a finite number ({line[:120]!r}): '{layout}'")
        values.append(row)
        names.append(fields[0])
    if not names:
        raise IjbError(f"{path}: no faces listed")
    return names, np.asarray(values, dtype=np.float64)


def _read_int_rows(path: Path, num_values: int, layout: str) -> np.ndarray:
    """Lines of ``num_values`` integers as int64 ``[lines, num_values]`` (IJB-C's 15.6M pairs in seconds)."""
    if not path.is_file():
        raise IjbError(f"{path}: IJB meta file not found")
    content = path.read_bytes().strip()
    num_lines = content.count(b"\n") + 1 if content else 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 1.x: partial parse instead of an error
            values = np.fromstring(content, dtype=np.int64, sep=" ")  # type: ignore[call-overload]
    except ValueError:
        values = np.empty(0, dtype=np.int64)  # the line-by-line pass below names the bad line
    if num_lines and values.size == num_lines * num_values:
        return values.reshape(num_lines, num_values)
    rows = []
    for number, line in enumerate(content.decode(errors="replace").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != num_values or not all(field.lstrip("-").isdigit() for field in fields):
            raise IjbError(f"{path}:{number}: expected '{layout}', got {line[:120]!r}")
        rows.append([int(field) for field in fields])
    if not rows:
        raise IjbError(f"{path}: no pairs listed")
    return np.asarray(rows, dtype=np.int64)


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of ``path`` with their 1-based line numbers."""
    if not path.is_file():
        raise IjbError(f"{path}: IJB meta file not found")
    return [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]


def _check_images(root: Path, listing: Path, names: list[str]) -> None:
    folder = root / "loose_crop"
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise IjbError(
            f"{folder}: {len(missing)} of the {len(names)} images listed in {listing.name} are missing, "
            f"first: {', '.join(missing[:_MAX_LISTED])}"
        )


def image_features(
    views: np.ndarray,
    faceness: np.ndarray,
    flip: bool = True,
    faceness_weighting: bool = True,
    normalize_images: bool = False,
) -> np.ndarray:
    """Per-face features ``[N, D]`` float64 from the view embeddings ``[V, N, D]`` (view 0: the image itself).

    ``flip`` sums the views; ``normalize_images`` drops the feature norm before weighting
    (insightface's N0 mode; by default the norm, a quality signal, is kept).
    """
    features = views.sum(axis=0, dtype=np.float64) if flip else views[0].astype(np.float64)
    if normalize_images:
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        features /= np.where(norms == 0, 1.0, norms)
    if faceness_weighting:
        features *= faceness.astype(np.float64)[:, None]
    return features


def template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique template ids ``[T]`` and their unit features ``[T, D]``.

    A template's feature is the sum over its media of the mean feature of that media's faces.
    """
    order = np.lexsort((medias, templates))
    sorted_templates, sorted_medias = templates[order], medias[order]
    boundary = (np.diff(sorted_templates) != 0) | (np.diff(sorted_medias) != 0)
    media_starts = np.r_[0, np.flatnonzero(boundary) + 1]
    media_sizes = np.diff(np.r_[media_starts, len(order)])
    media_means = np.add.reduceat(features[order], media_starts, axis=0, dtype=np.float64) / media_sizes[:, None]
    media_templates = sorted_templates[media_starts]
    template_starts = np.r_[0, np.flatnonzero(np.diff(media_templates)) + 1]
    sums = np.add.reduceat(media_means, template_starts, axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return media_templates[template_starts], sums / np.where(norms == 0, 1.0, norms)


def pair_scores(
    template_ids: np.ndarray, features: np.ndarray, pairs: np.ndarray, chunk: int = 100_000
) -> np.ndarray:
    """Cosine score ``[P]`` float64 of each template pair, computed ``chunk`` pairs at a time."""
    rows = np.searchsorted(template_ids, pairs)
    valid = rows < len(template_ids)
    valid[valid] = template_ids[rows[valid]] == pairs[valid]
    if not valid.all():
        raise IjbError(f"{int((~valid.all(axis=1)).sum())} pairs name templates without features")
    scores = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), chunk):
        first, second = rows[start : start + chunk, 0], rows[start : start + chunk, 1]
        scores[start : start + chunk] = np.einsum("ij,ij->i", features[first], features[second])
    return scores


@dataclass(frozen=True)
class IjbResult:
    """Scores in pair-file order, the ROC and both readings of TAR at ``IJB_FARS``.

    ``points``: the primary reading (FAR <= target); ``nearest_points``: the ROC point
    nearest each target, as insightface's tables report it.
    """

    target: str
    scores: np.ndarray
    labels: np.ndarray
    curve: RocCurve
    points: list[OperatingPoint]
    nearest_points: list[OperatingPoint]


def score_ijb(
    protocol: IjbProtocol,
    views: np.ndarray,
    flip: bool = True,
    faceness_weighting: bool = True,
    normalize_images: bool = False,
) -> IjbResult:
    """Template-pair scores and TAR@FAR of the face view embeddings ``[V, N, D]``."""
    if views.ndim != 3 or views.shape[1] != len(protocol.image_names):
        raise ValueError(f"views {views.shape} do not match the {len(protocol.image_names)} faces")
    features = image_features(views, protocol.faceness, flip, faceness_weighting, normalize_images)
    template_ids, template_feats = template_features(features, protocol.templates, protocol.medias)
    scores = pair_scores(template_ids, template_feats, protocol.template_pairs)
    curve = roc_curve(scores, protocol.labels)
    return IjbResult(
        protocol.target,
        scores,
        protocol.labels,
        curve,
        points=operating_points(curve, IJB_FARS),
        nearest_points=nearest_operating_points(curve, IJB_FARS),
    )


def format_tar_table(result: IjbResult, model: str) -> str:
    """A Markdown table per FAR target: both TAR (%) readings, the primary's threshold and the nearest point's FAR."""

    def row(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    points, nearest = result.points, result.nearest_points
    percent = [f"{100 * point.tar:.2f}" for point in points]
    nearest_percent = [f"{100 * point.tar:.2f}" for point in nearest]
    return "\n".join(
        [
            row("model", [f"{point.far_target:.0e}" for point in points]),
            "|---|" + "---|" * len(points),
            row(f"{model} TAR (%), FAR <= target", percent),
            row("threshold", [f"{point.threshold:.4f}" for point in points]),
            row(f"{model} TAR (%), nearest ROC point (insightface's tables)", nearest_percent),
            row("FAR of that point", [f"{point.far:.2e}" for point in nearest]),
        ]
    )


def write_ijb_outputs(
    result: IjbResult, out_dir: str | os.PathLike[str], name: str, model: str, settings: dict[str, object]
) -> dict[str, Path]:
    """Save ``<target>_scores.npy``, ``<target>_tar_at_far.json`` and ``<target>_roc.png`` into ``out_dir``.

    ``name`` labels the curve, ``model`` (a longer description) goes into the JSON.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result.target.lower()
    paths = {
        "scores": out_dir / f"{stem}_scores.npy",
        "table": out_dir / f"{stem}_tar_at_far.json",
        "roc": out_dir / f"{stem}_roc.png",
    }
    np.save(paths["scores"], result.scores)
    summary = {
        "target": result.target,
        "name": name,
        "model": model,
        "settings": settings,
        "pairs": {"genuine": result.curve.num_genuine, "impostor": result.curve.num_impostor},
        "readings": READINGS,
        "tar_at_far": [point.__dict__ for point in result.points],
        "tar_at_far_nearest": [point.__dict__ for point in result.nearest_points],
    }
    paths["table"].write_text(json.dumps(summary, indent=2) + "\n")
    save_roc_plot({name: result.curve}, paths["roc"], f"{result.target} 1:1 verification")
    return paths
