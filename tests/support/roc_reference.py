"""Reference TAR@FAR readings computed by direct loops, independent of ``sface_dist.evaluation.roc``."""

from __future__ import annotations

import math


def brute_force_tar_at_far(scores: list[float], same: list[bool], far: float) -> tuple[float, float]:
    """Highest TAR over every threshold (accept ``score >= t``) whose FAR <= ``far``, and that threshold."""
    genuine = [s for s, g in zip(scores, same) if g]
    impostor = [s for s, g in zip(scores, same) if not g]
    best_tar, best_threshold = 0.0, math.inf
    for threshold in sorted(set(scores), reverse=True):
        false_accept = sum(s >= threshold for s in impostor) / len(impostor)
        true_accept = sum(s >= threshold for s in genuine) / len(genuine)
        if false_accept <= far and true_accept > best_tar:
            best_tar, best_threshold = true_accept, threshold
    return best_tar, best_threshold


def sklearn_roc_by_loops(scores: list[float], same: list[bool]) -> list[tuple[int, int, float]]:
    """scikit-learn's ``roc_curve`` with ``drop_intermediate=True`` as ``(false accepts, true accepts, threshold)``.

    One point per distinct score; a middle point is dropped when its step in equals its
    step out (in both counts); ``(0, 0, inf)`` goes in front afterwards.
    """
    points = []
    for threshold in sorted(set(scores), reverse=True):
        accepted = [g for s, g in zip(scores, same) if s >= threshold]
        points.append((accepted.count(False), accepted.count(True), threshold))
    if len(points) > 2:
        kept = [points[0]]
        for before, point, after in zip(points, points[1:], points[2:]):
            step_in = (point[0] - before[0], point[1] - before[1])
            step_out = (after[0] - point[0], after[1] - point[1])
            if step_in != step_out:
                kept.append(point)
        points = kept + [points[-1]]
    return [(0, 0, math.inf)] + points


def insightface_tar_at_far(scores: list[float], same: list[bool], far: float) -> tuple[float, float, float]:
    """``(tar, far, threshold)`` as insightface's IJB script reads it: reverse the ROC, take the first nearest FAR."""
    num_impostor, num_genuine = same.count(False), same.count(True)
    points = sklearn_roc_by_loops(scores, same)[::-1]
    _, nearest = min((abs(false / num_impostor - far), index) for index, (false, _, _) in enumerate(points))
    false, true, threshold = points[nearest]
    return true / num_genuine, false / num_impostor, threshold
