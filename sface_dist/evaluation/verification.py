"""1:1 verification accuracy with insightface's protocol (``arcface_torch/eval/verification.py``).

Each image is embedded together with its horizontal mirror, the two
embeddings are summed and L2-normalised, and a pair is "same" when the
squared L2 distance is below a threshold from ``np.arange(0, 4, 0.01)``.
Ten folds in order (scikit-learn ``KFold`` without shuffling): the threshold
that maximises accuracy on nine folds is scored on the tenth. TAR at FAR
1e-3 and 1e-4 come from the ROC of all pairs' cosine similarities, read as the
highest TAR at FAR <= target (``roc.tar_at_far``); insightface's verification
script logs accuracy and XNorm only, so there is no published reading to match.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sface_dist.data.bin_pack import VerificationPack
from sface_dist.evaluation.embedder import Embedder, TorchEmbedder, embed_views
from sface_dist.evaluation.roc import tar_at_far
from sface_dist.progress_bar import ProgressBar

THRESHOLDS = np.arange(0, 4, 0.01)
N_FOLDS = 10
VERIFICATION_FARS: tuple[float, ...] = (1e-3, 1e-4)


@dataclass(frozen=True)
class VerificationResult:
    """The scores of one pack.

    ``accuracy``/``std``: mean and std of the ten test-fold accuracies; ``threshold``:
    mean of the per-fold best squared-L2 thresholds between unit embeddings (a pair is
    "same" below it); ``tar_at_far``: ``{far: tar}`` over all pairs; ``xnorm``: mean
    L2 norm of the un-normalised view embeddings, as insightface logs it.
    """

    accuracy: float
    std: float
    threshold: float
    xnorm: float
    tar_at_far: dict[float, float]
    num_pairs: int

    @property
    def cosine_threshold(self) -> float:
        """``threshold`` as a cosine similarity (``|a - b|^2 = 2 - 2 cos``): "same" above it."""
        return 1.0 - self.threshold / 2.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, FAR keys written like ``1e-03``."""
        values = asdict(self)
        values["tar_at_far"] = {f"{far:.0e}": tar for far, tar in self.tar_at_far.items()}
        values["cosine_threshold"] = self.cosine_threshold
        return values


def require_folds(path: str | os.PathLike[str], pairs: int) -> None:
    """One line naming the pack at ``path`` when its ``pairs`` cannot fill the ``N_FOLDS``-fold protocol."""
    if pairs < N_FOLDS:
        raise ValueError(f"{path}: {pairs} pairs; the {N_FOLDS}-fold protocol needs at least {N_FOLDS}")


def kfold_splits(n_samples: int, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` index arrays of scikit-learn's ``KFold(n_folds, shuffle=False)``.

    Consecutive folds; the first ``n_samples % n_folds`` folds are one sample larger.
    """
    if not 2 <= n_folds <= n_samples:
        raise ValueError(f"need 2 <= n_folds <= number of pairs, got n_folds={n_folds} for {n_samples} pairs")
    sizes = np.full(n_folds, n_samples // n_folds)
    sizes[: n_samples % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    indices = np.arange(n_samples)
    return [
        (np.concatenate([indices[:start], indices[stop:]]), indices[start:stop])
        for start, stop in zip(bounds[:-1], bounds[1:])
    ]


def _accuracy_per_threshold(distances: np.ndarray, issame: np.ndarray) -> np.ndarray:
    """Accuracy of ``distance < t`` as the same-identity prediction, for every ``t`` in ``THRESHOLDS``."""
    predicted_same = distances[None, :] < THRESHOLDS[:, None]
    return (predicted_same == issame[None, :]).mean(axis=1)


def verification_accuracy(
    embeddings: np.ndarray | torch.Tensor, issame: np.ndarray, n_folds: int = N_FOLDS
) -> VerificationResult:
    """Score pairs ``(2i, 2i+1)`` of un-normalised ``embeddings`` against ``issame`` ``[N]``.

    ``embeddings`` is ``[2N, D]``, or ``[V, 2N, D]`` for V views of each image
    (see ``embed_views``), which are summed. XNorm is the mean L2 norm of the
    individual un-normalised (view) embeddings, as insightface logs it.
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    views = np.asarray(embeddings, dtype=np.float64)
    if views.ndim == 2:
        views = views[None]
    issame = np.asarray(issame, dtype=np.bool_)
    if views.ndim != 3 or issame.ndim != 1 or views.shape[1] != 2 * len(issame):
        raise ValueError(
            f"embeddings {list(np.shape(embeddings))} do not match {len(issame)} pairs: "
            f"expected [2N, D] or [V, 2N, D] with 2N = {2 * len(issame)}"
        )
    xnorm = float(np.linalg.norm(views, axis=2).mean())
    summed = views.sum(axis=0)
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    normalized = summed / np.where(norms == 0, 1.0, norms)
    distances = np.square(normalized[0::2] - normalized[1::2]).sum(axis=1)

    fold_accuracy, fold_threshold = [], []
    for train, test in kfold_splits(len(issame), n_folds):
        best = int(np.argmax(_accuracy_per_threshold(distances[train], issame[train])))
        fold_threshold.append(THRESHOLDS[best])
        fold_accuracy.append(np.mean((distances[test] < THRESHOLDS[best]) == issame[test]))
    cosines = (normalized[0::2] * normalized[1::2]).sum(axis=1)
    return VerificationResult(
        accuracy=float(np.mean(fold_accuracy)),
        std=float(np.std(fold_accuracy)),
        threshold=float(np.mean(fold_threshold)),
        xnorm=xnorm,
        tar_at_far=tar_at_far(cosines, issame, VERIFICATION_FARS),
        num_pairs=len(issame),
    )


def evaluate_embedder(
    embed: Embedder,
    pack: VerificationPack,
    batch_size: int,
    flip: bool = True,
    n_folds: int = N_FOLDS,
    progress: ProgressBar | None = None,
) -> VerificationResult:
    """Verification scores of ``embed`` on a pack, with the flip test unless ``flip`` is False."""
    if not pack.is_complete:
        raise ValueError(f"{pack.name}: holds {len(pack.images)} of its {2 * len(pack.issame)} images (a shard)")
    views = embed_views(embed, pack.images, batch_size, flip, progress)
    return verification_accuracy(views, pack.issame, n_folds)


def evaluate_pack(
    model: nn.Module,
    pack: VerificationPack,
    batch_size: int,
    device: torch.device | str,
    n_folds: int = N_FOLDS,
    flip: bool = True,
) -> VerificationResult:
    """``evaluate_embedder`` for a PyTorch backbone already on ``device``."""
    return evaluate_embedder(TorchEmbedder(model, device), pack, batch_size, flip, n_folds)
