"""The insightface 10-fold verification protocol and the scores of a whole pack."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sface_dist.backbones import build_backbone
from sface_dist.data.bin_pack import VerificationPack, read_bin, write_bin
from sface_dist.evaluation.embedder import TorchEmbedder, embed_views
from sface_dist.evaluation.verification import (
    THRESHOLDS,
    VERIFICATION_FARS,
    evaluate_pack,
    kfold_splits,
    verification_accuracy,
)

from pack_fixtures import encode_image
from roc_reference import brute_force_tar_at_far


def brute_force_protocol(embeddings: np.ndarray, issame: list[bool], n_folds: int) -> tuple[float, float, float]:
    """insightface's evaluate() by direct loops in float64: (mean accuracy, std, mean threshold)."""
    rows = [[float(v) for v in row] for row in embeddings]
    unit = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in rows]
    dist = [sum((a - b) ** 2 for a, b in zip(unit[2 * i], unit[2 * i + 1])) for i in range(len(issame))]
    thresholds = [i * 0.01 for i in range(400)]
    n = len(issame)
    fold_sizes = [n // n_folds + (1 if f < n % n_folds else 0) for f in range(n_folds)]
    accuracies, chosen = [], []
    start = 0
    for size in fold_sizes:
        test = list(range(start, start + size))
        train = [i for i in range(n) if i < start or i >= start + size]
        start += size
        best_threshold, best_correct = None, -1
        for threshold in thresholds:
            correct = sum((dist[i] < threshold) == issame[i] for i in train)
            if correct > best_correct:
                best_threshold, best_correct = threshold, correct
        accuracies.append(sum((dist[i] < best_threshold) == issame[i] for i in test) / len(test))
        chosen.append(best_threshold)
    mean = sum(accuracies) / n_folds
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / n_folds)
    return mean, std, sum(chosen) / n_folds


def noisy_pairs(n_pairs: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    first = rng.normal(size=(n_pairs, dim))
    second = np.where(issame[:, None], first, rng.normal(size=(n_pairs, dim))) + noise * rng.normal(size=(n_pairs, dim))
    embeddings = np.empty((2 * n_pairs, dim))
    embeddings[0::2], embeddings[1::2] = first * rng.uniform(0.5, 3, (n_pairs, 1)), second
    return embeddings, issame


@pytest.mark.parametrize(("n_pairs", "n_folds", "seed"), [(57, 10, 0), (40, 10, 1), (33, 5, 2)])
def test_accuracy_matches_brute_force_reference(n_pairs: int, n_folds: int, seed: int) -> None:
    embeddings, issame = noisy_pairs(n_pairs, dim=8, noise=0.9, seed=seed)
    result = verification_accuracy(embeddings, issame, n_folds=n_folds)
    accuracy, std, threshold = brute_force_protocol(embeddings, issame.tolist(), n_folds)
    assert 0.6 < accuracy < 1.0  # neither trivial nor hopeless
    assert result.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert result.std == pytest.approx(std, abs=1e-12)
    assert result.threshold == pytest.approx(threshold, abs=1e-12)


def test_kfold_splits_match_scikit_learn_layout() -> None:
    splits = kfold_splits(23, 10)
    assert [test.tolist() for _, test in splits][:4] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert [len(test) for _, test in splits] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    for train, test in splits:
        assert sorted(train.tolist() + test.tolist()) == list(range(23))
    with pytest.raises(ValueError, match="n_folds=10 for 5 pairs"):
        kfold_splits(5, 10)


def test_thresholds_are_insightface_grid() -> None:
    assert len(THRESHOLDS) == 400 and THRESHOLDS[0] == 0 and THRESHOLDS[-1] == pytest.approx(3.99)


def test_separable_embeddings_score_one() -> None:
    rng = np.random.default_rng(0)
    issame = np.arange(200) % 2 == 0
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    embeddings = np.empty((400, 64))
    embeddings[0::2] = basis[np.arange(200) % 32]
    embeddings[1::2] = np.where(issame[:, None], basis[np.arange(200) % 32], basis[32 + np.arange(200) % 32])
    result = verification_accuracy(embeddings, issame)
    assert result.accuracy == 1.0 and result.std == 0.0
    assert 0 < result.threshold <= 2.0


def test_random_embeddings_score_chance() -> None:
    rng = np.random.default_rng(1)
    result = verification_accuracy(rng.normal(size=(4000, 64)), rng.random(2000) < 0.5)
    assert 0.44 < result.accuracy < 0.56


def test_views_are_summed_and_xnorm_averages_view_norms() -> None:
    embeddings, issame = noisy_pairs(50, dim=8, noise=0.5, seed=3)
    mirrored = embeddings + 0.1 * np.random.default_rng(4).normal(size=embeddings.shape)
    views = np.stack([embeddings, mirrored])
    result = verification_accuracy(views, issame)
    summed = verification_accuracy(torch.from_numpy(embeddings + mirrored), issame)
    assert (result.accuracy, result.std, result.threshold) == (summed.accuracy, summed.std, summed.threshold)
    expected_xnorm = np.mean(np.concatenate([np.linalg.norm(embeddings, axis=1), np.linalg.norm(mirrored, axis=1)]))
    assert result.xnorm == pytest.approx(expected_xnorm)


def test_mismatched_embeddings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"do not match 3 pairs"):
        verification_accuracy(np.ones((5, 4)), np.array([True, False, True]))


def test_verification_result_reports_tar_on_pair_cosines() -> None:
    embeddings, issame = noisy_pairs(300, dim=8, noise=0.8, seed=5)
    result = verification_accuracy(embeddings, issame)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosines = (unit[0::2] * unit[1::2]).sum(axis=1)
    assert set(result.tar_at_far) == set(VERIFICATION_FARS) and result.num_pairs == 300
    for far, tar in result.tar_at_far.items():
        assert tar == pytest.approx(brute_force_tar_at_far(cosines.tolist(), issame.tolist(), far)[0])
    assert result.cosine_threshold == pytest.approx(1 - result.threshold / 2)
    assert result.to_dict()["tar_at_far"].keys() == {"1e-03", "1e-04"}


def test_evaluate_pack_end_to_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "tiny.bin"
    issame = [i % 2 == 0 for i in range(20)]
    seeds = [(pair, pair if issame[pair] else 100 + pair) for pair in range(20)]
    images = [encode_image(seed) for pair_seeds in seeds for seed in pair_seeds]
    write_bin(path, images, issame)
    pack = read_bin(path)
    model = build_backbone("tiny", embedding_size=32)
    result = evaluate_pack(model, pack, batch_size=16, device="cpu")
    assert result.accuracy == 1.0  # identical images are at distance 0
    views = embed_views(TorchEmbedder(model), pack.images, 16)
    assert result.xnorm == pytest.approx(views.norm(dim=2).mean().item(), rel=1e-6)
    assert isinstance(pack, VerificationPack)


def test_evaluate_pack_refuses_a_shard(tmp_path: Path) -> None:
    path = tmp_path / "lfw.bin"
    write_bin(path, [encode_image(seed) for seed in range(10)], [True, False, True, False, True])
    with pytest.raises(ValueError, match="holds 3 of its 10 images"):
        evaluate_pack(nn.Identity(), read_bin(path, shard=(1, 3)), batch_size=4, device="cpu")
