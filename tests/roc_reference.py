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
