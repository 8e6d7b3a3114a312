"""ROC of similarity scores: TAR at a fixed FAR, read two ways, and the curve as a PNG.

A pair is accepted when its score is ``>= threshold``. The curve has one point per
distinct score (ties move together), plus ``(0, 0)`` at ``threshold = +inf``.

* ``operating_points`` (the primary reading, "FAR <= target"): the highest
  true-accept rate among thresholds whose false-accept rate is at most the target
  (the NIST definition); below ``1 / impostor pairs`` that means no false accept at all.
* ``nearest_operating_points`` ("nearest ROC point"): what insightface's IJB scripts
  report, and so its published IJB-B/C tables: the point of scikit-learn's
  ``roc_curve`` (``drop_intermediate=True``) whose FAR is nearest the target, which
  may lie above it. Where the curve is steep (the lowest FARs), the two can differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

IJB_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_PLOT_MIN_FAR = 1e-6


@dataclass(frozen=True)
class RocCurve:
    """Points of a ROC curve, in order of decreasing threshold (increasing FAR and TAR)."""

    far: np.ndarray
    tar: np.ndarray
    thresholds: np.ndarray
    false_accepts: np.ndarray
    """int64 impostor pairs accepted at each point: the count behind ``far``."""
    true_accepts: np.ndarray
    """int64 genuine pairs accepted at each point."""
    num_genuine: int
    num_impostor: int


@dataclass(frozen=True)
class OperatingPoint:
    """The ROC point read at a FAR target: its TAR, its FAR and the score threshold that reaches it."""

    far_target: float
    tar: float
    far: float
    threshold: float


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> RocCurve:
    """The ROC of ``scores`` (higher = more similar) against bool ``labels`` (True = same identity)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be 0/1 or bool")
        labels = labels.astype(np.bool_)
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} of {scores.size} scores are not finite")
    num_genuine = int(labels.sum())
    num_impostor = labels.size - num_genuine
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(f"a ROC needs genuine and impostor pairs, got {num_genuine} and {num_impostor}")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_accepts = np.cumsum(sorted_labels)[last_of_tie]
    false_accepts = last_of_tie + 1 - true_accepts
    return RocCurve(
        far=np.r_[0.0, false_accepts / num_impostor],
        tar=np.r_[0.0, true_accepts / num_genuine],
        thresholds=np.r_[np.inf, sorted_scores[last_of_tie]],
        false_accepts=np.r_[0, false_accepts],
        true_accepts=np.r_[0, true_accepts],
        num_genuine=num_genuine,
        num_impostor=num_impostor,
    )


def operating_points(curve: RocCurve, far_targets: tuple[float, ...]) -> list[OperatingPoint]:
    """For each FAR target, the highest TAR whose FAR does not exceed it, at the highest threshold reaching it."""
    points = []
    for target in far_targets:
        last_allowed = int(np.searchsorted(curve.far, target, side="right")) - 1
        index = int(np.searchsorted(curve.tar[: last_allowed + 1], curve.tar[last_allowed], side="left"))
        tar, far, threshold = (float(values[index]) for values in (curve.tar, curve.far, curve.thresholds))
        points.append(OperatingPoint(far_target=target, tar=tar, far=far, threshold=threshold))
    return points


def sklearn_roc_points(curve: RocCurve) -> np.ndarray:
    """Indices of the points that scikit-learn's ``roc_curve(..., drop_intermediate=True)`` returns.

    scikit-learn drops a point of its distinct-score curve when the steps into and out
    of it are equal in both false and true accepts (a zero second difference); the first
    and last points stay, and ``(0, 0)`` is added in front after the dropping.
    """
    false_accepts, true_accepts = curve.false_accepts[1:], curve.true_accepts[1:]
    if false_accepts.size <= 2:
        return np.arange(false_accepts.size + 1)
    corner = (np.diff(false_accepts, 2) != 0) | (np.diff(true_accepts, 2) != 0)
    return np.r_[0, np.flatnonzero(np.r_[True, corner, True]) + 1]


def nearest_operating_points(curve: RocCurve, far_targets: tuple[float, ...]) -> list[OperatingPoint]:
    """For each FAR target, the point among ``sklearn_roc_points`` whose FAR is nearest it, as insightface reads it.

    insightface reverses the curve and takes the first minimum of ``|far - target|``, so a
    tie in distance goes to the later point (the higher TAR at equal FAR).
    """
    kept = sklearn_roc_points(curve)
    reversed_far = curve.far[kept][::-1]
    points = []
    for target in far_targets:
        index = int(kept[len(kept) - 1 - int(np.argmin(np.abs(reversed_far - target)))])
        tar, far, threshold = (float(values[index]) for values in (curve.tar, curve.far, curve.thresholds))
        points.append(OperatingPoint(far_target=target, tar=tar, far=far, threshold=threshold))
    return points


def tar_at_far(scores: np.ndarray, labels: np.ndarray, far_targets: tuple[float, ...]) -> dict[float, float]:
    """``{far: tar}`` for each target, the primary reading (highest TAR at FAR <= target)."""
    return {point.far_target: point.tar for point in operating_points(roc_curve(scores, labels), far_targets)}


def import_pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend, or an error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise ImportError("the ROC plot needs matplotlib: pip install 'sface_dist[export]'") from None
    return pyplot


def save_roc_plot(curves: dict[str, RocCurve], path: str | os.PathLike[str], title: str) -> None:
    """Plot TAR against log-scale FAR (1e-6 to 1) for each named curve into a PNG, legend in the corner."""
    pyplot = import_pyplot()
    figure, axes = pyplot.subplots(figsize=(6, 4.5), dpi=120)
    try:
        for name, curve in curves.items():
            # TAR at FAR <= x is a step function; FAR 0 sits at the left edge of the log axis.
            far = np.maximum(curve.far, _PLOT_MIN_FAR)
            axes.step(far, curve.tar, where="post", label=name, linewidth=1.5)
        axes.set_xscale("log")
        axes.set_xlim(_PLOT_MIN_FAR, 1.0)
        axes.set_ylim(0.0, 1.0)
        axes.set_xlabel("False accept rate")
        axes.set_ylabel("True accept rate")
        axes.set_title(title)
        axes.grid(True, which="major", linestyle="--", linewidth=0.5)
        axes.legend(loc="lower right")
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        pyplot.close(figure)
