"""ROC curves of pair scores and the TAR@FAR read from them."""

from __future__ import annotations

import numpy as np
import pytest

from sface_dist.evaluation.roc import (
    IJB_FARS,
    nearest_operating_points,
    operating_points,
    roc_curve,
    sklearn_roc_points,
)

from roc_reference import brute_force_tar_at_far, insightface_tar_at_far, sklearn_roc_by_loops


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


def test_sklearn_roc_points_match_the_loop_reference_with_ties() -> None:
    rng = np.random.default_rng(7)
    for size in (2, 3, 5, 40, 400):
        same = rng.random(size) < 0.4
        same[:2] = [True, False]
        scores = np.round(rng.normal(size=size) + same, 1)
        curve = roc_curve(scores, same)
        points = [(int(curve.false_accepts[i]), int(curve.true_accepts[i]), float(curve.thresholds[i]))
                  for i in sklearn_roc_points(curve)]  # fmt: skip
        assert points == sklearn_roc_by_loops(scores.tolist(), same.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nearest_reading_matches_insightface_by_loops_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    same = rng.random(500) < 0.3
    scores = np.round(rng.normal(size=500) + 1.5 * same, 1)  # many ties, across labels too
    curve = roc_curve(scores, same)
    exact_fars = tuple(float(far) for far in rng.choice(curve.far, 4))  # on a point, and midway between two
    midway = tuple(float((a + b) / 2) for a, b in zip(curve.far[:-1], curve.far[1:]) if a != b)[:4]
    targets = IJB_FARS + (0.0, 0.013, 0.25, 1.0) + exact_fars + midway
    for point in nearest_operating_points(curve, targets):
        tar, far, threshold = insightface_tar_at_far(scores.tolist(), same.tolist(), point.far_target)
        assert (point.tar, point.far, point.threshold) == (tar, far, threshold)


def test_nearest_point_above_the_target_differs_from_the_primary_reading() -> None:
    # Pairs by falling score: G I I I G I I I I I I I (2 genuine, 10 impostor). scikit-learn keeps
    # (0,0) (0,1) (3,1) (3,2) (10,2) as (false, true) accepts: the points at 1 and 2 false accepts
    # lie inside a run of equal steps and are dropped.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03])
    same = np.array([True, False, False, False, True] + [False] * 7)
    curve = roc_curve(scores, same)
    (primary,) = operating_points(curve, (0.2,))
    assert (primary.tar, primary.far, primary.threshold) == (0.5, 0.0, 0.9)  # 2 false accepts reach no more TAR
    (nearest,) = nearest_operating_points(curve, (0.2,))
    assert (nearest.tar, nearest.far, nearest.threshold) == (1.0, 0.3, 0.5)  # FAR 0.2 itself is no kept point


def test_nearest_reading_breaks_distance_ties_towards_the_higher_tar() -> None:
    # Pairs by falling score: G I G G G I I I (4 genuine, 4 impostor). scikit-learn keeps (0,0) (0,1) (1,1) (1,4)
    # (4,4) as (false, true) accepts; for FAR 0.2, (1,1) and (1,4) are equally near (FAR 0.25): the later one wins.
    scores = np.array([0.95, 0.9, 0.85, 0.75, 0.65, 0.3, 0.2, 0.1])
    same = np.array([True, False, True, True, True, False, False, False])
    curve = roc_curve(scores, same)
    assert sklearn_roc_points(curve).tolist() == [0, 1, 2, 5, 8]
    (nearest,) = nearest_operating_points(curve, (0.2,))
    assert (nearest.tar, nearest.far, nearest.threshold) == (1.0, 0.25, 0.65)
    (primary,) = operating_points(curve, (0.2,))
    assert (primary.tar, primary.far) == (0.25, 0.0)
