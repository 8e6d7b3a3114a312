"""ROC curves of pair scores and the TAR@FAR read from them."""

from __future__ import annotations

import numpy as np
import pytest

from sface_dist.evaluation.roc import operating_points, roc_curve

from roc_reference import brute_force_tar_at_far


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    same = rng.random(400) < 0.3
    scores = np.round(rng.normal(size=400) + 1.5 * same, 1)  # rounding makes many ties, across labels too
    curve = roc_curve(scores, same)
    assert curve.num_genuine == same.sum() and curve.num_impostor == (~same).sum()
    for point in operating_points(curve, (0.0, 1e-3, 0.01, 0.05, 0.2, 1.0)):
        tar, threshold = brute_force_tar_at_far(scores.tolist(), same.tolist(), point.far_target)
        assert point.tar == pytest.approx(tar, abs=1e-12)
        if tar > 0:
            assert point.threshold == threshold
            assert point.far <= point.far_target


def test_roc_rejects_one_sided_and_non_finite_input() -> None:
    with pytest.raises(ValueError, match="genuine and impostor pairs, got 3 and 0"):
        roc_curve(np.ones(3), np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="1 of 2 scores are not finite"):
        roc_curve(np.array([0.5, np.nan]), np.array([True, False]))
