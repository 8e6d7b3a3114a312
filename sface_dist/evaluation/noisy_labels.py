"""Suspected label noise: training images that sit far from their own class or closer to another one.

A trained head's weight rows are class centres. Each training image (embedded with the
flip test) is scored by its cosine to its own centre, to the nearest other centre (which
it names) and to the mean of its identity's other images. An image is a suspect when
another centre is nearer than its own, or when its own centre's cosine is below a
threshold: a mislabelled image that the loss did not pull in (SFace's claim) stays far
from the centre it was labelled with.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

DEFAULT_THRESHOLD = 0.2
"""Own-centre cosine below which an image is a suspect even when no other centre is nearer."""


@dataclass(frozen=True)
class LabelScores:
    """Per image: cosines to its own centre, to the nearest other centre (and which), to its identity's other images."""

    own: np.ndarray
    nearest: np.ndarray
    nearest_class: np.ndarray
    identity: np.ndarray
    """NaN for an identity's only image."""

    def suspects(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """Indices of the suspects, most suspicious first (largest lead of another centre over the own one)."""
        flagged = np.flatnonzero((self.nearest > self.own) | (self.own < threshold))
        return flagged[np.argsort(self.own[flagged] - self.nearest[flagged], kind="stable")]


def score_labels(
    embeddings: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, block: int = 4096
) -> LabelScores:
    """Score ``embeddings [N, D]`` labelled ``labels [N]`` against class ``centres [C, D]`` (any scale).

    Works in blocks of ``block`` images and classes, so memory stays O(block²) at millions of each.
    """
    if embeddings.shape[0] != labels.shape[0] or embeddings.shape[1] != centres.shape[1]:
        raise ValueError(f"shapes do not match: embeddings {tuple(embeddings.shape)}, labels "
                         f"{tuple(labels.shape)}, centres {tuple(centres.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= centres.shape[0]):
        raise ValueError(f"labels must lie in [0, {centres.shape[0]}), got [{labels.min()}, {labels.max()}]")
    x = F.normalize(embeddings.float(), dim=1)
    w = F.normalize(centres.float(), dim=1)
    own = (x * w[labels]).sum(dim=1)
    nearest = torch.full_like(own, -2.0)
    nearest_class = torch.zeros_like(labels)
    for start in range(0, len(x), block):
        rows = slice(start, start + block)
        for first in range(0, len(w), block):
            cos = x[rows] @ w[first : first + block].t()
            local = labels[rows] - first
            inside = (local >= 0) & (local < cos.shape[1])
            cos[inside.nonzero().squeeze(1), local[inside]] = -2.0
            best, where = cos.max(dim=1)
            better = best > nearest[rows]
            nearest[rows] = torch.where(better, best, nearest[rows])
            nearest_class[rows] = torch.where(better, where + first, nearest_class[rows])
    sums = torch.zeros_like(w).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=len(w))
    others = F.normalize(sums[labels] - x, dim=1)
    identity = torch.where(counts[labels] > 1, (x * others).sum(dim=1), torch.nan)
    return LabelScores(own.numpy(), nearest.numpy(), nearest_class.numpy(), identity.numpy())


def write_suspects(
    out_dir: str | os.PathLike[str], keys: np.ndarray, labels: np.ndarray, scores: LabelScores, threshold: float
) -> tuple[Path, Path, int]:
    """Write ``suspects.csv`` (most suspicious first) and ``exclude.txt`` (their keys, for ``repack --exclude``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = scores.suspects(threshold)
    table, listing = out_dir / "suspects.csv", out_dir / "exclude.txt"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label", "own_cosine", "nearest_class", "nearest_cosine", "identity_cosine"])
        for i in order.tolist():
            writer.writerow([int(keys[i]), int(labels[i]), f"{scores.own[i]:.4f}", int(scores.nearest_class[i]),
                             f"{scores.nearest[i]:.4f}", f"{scores.identity[i]:.4f}"])
    listing.write_text("".join(f"{int(keys[i])}\n" for i in order.tolist()))
    return table, listing, len(order)
