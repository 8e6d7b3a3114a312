"""1:1 verification accuracy with insightface's protocol (``arcface_torch/eval/verification.py``).

Each image is embedded together with its horizontal mirror, the two
embeddings are summed and L2-normalised, and a pair is "same" when the
squared L2 distance is below a threshold from ``np.arange(0, 4, 0.01)``.
Ten folds in order (scikit-learn ``KFold`` without shuffling): the threshold
that maximises accuracy on nine folds is scored on the tenth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sface_dist.evaluation.bin_pack import VerificationPack

THRESHOLDS = np.arange(0, 4, 0.01)


@dataclass(frozen=True)
class VerificationResult:
    """Mean and std of the test-fold accuracies, mean selected threshold, and insightface's XNorm."""

    accuracy: float
    std: float
    threshold: float
    xnorm: float


@torch.no_grad()
def embed_views(
    model: nn.Module, images_uint8: torch.Tensor, batch_size: int, device: torch.device | str, flip: bool = True
) -> torch.Tensor:
    """Un-normalised float32 embeddings ``[V, M, D]`` on the CPU; views are (image, mirror), or the image alone.

    ``model`` must already be on ``device``; batches move there as uint8 and are
    mapped to ``(x - 127.5) / 127.5``. The model runs in eval mode and gets its
    training mode back afterwards.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"expected uint8 images [M, 3, H, W], got {images_uint8.dtype} {list(images_uint8.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        views = []
        for start in range(0, len(images_uint8), batch_size):
            batch = (images_uint8[start : start + batch_size].to(device).float() - 127.5) / 127.5
            inputs = (batch, batch.flip(3)) if flip else (batch,)
            views.append(torch.stack([model(x).float().cpu() for x in inputs]))
        return torch.cat(views, dim=1)
    finally:
        model.train(was_training)


def embed_images(
    model: nn.Module, images_uint8: torch.Tensor, batch_size: int, device: torch.device | str, flip: bool = True
) -> torch.Tensor:
    """Un-normalised float32 embeddings ``[M, D]``; with ``flip``, embedding(image) + embedding(mirror)."""
    return embed_views(model, images_uint8, batch_size, device, flip).sum(0)


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
    embeddings: np.ndarray | torch.Tensor, issame: np.ndarray, n_folds: int = 10
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
    return VerificationResult(
        accuracy=float(np.mean(fold_accuracy)),
        std=float(np.std(fold_accuracy)),
        threshold=float(np.mean(fold_threshold)),
        xnorm=xnorm,
    )


def evaluate_pack(
    model: nn.Module, pack: VerificationPack, batch_size: int, device: torch.device | str, n_folds: int = 10
) -> VerificationResult:
    """Flip-augmented verification accuracy of ``model`` on a pack."""
    views = embed_views(model, pack.images, batch_size, device, flip=True)
    return verification_accuracy(views, pack.issame, n_folds)
