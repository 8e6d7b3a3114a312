"""Suspected label noise: training images that sit far from their own class or closer to another one.

A trained head's weight rows are class centres. Each training image (embedded with the
flip test) is scored by its cosine to its own centre, to the nearest other centre (which
it names) and to the mean of its identity's other images. An image is a suspect when
another centre is nearer than its own (a mislabelled image that the loss did not pull in,
SFace's claim, stays nearer the centre of the identity it shows), or when it is far from
the other images of its label (the identity's images vote, whatever the head learnt).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch.nn import functional as F

from sface_dist.checkpoint import CheckpointError, head_classes, read_head_rows, read_model_config, resolve_checkpoint
from sface_dist.data.dataset_checks import known_num_classes
from sface_dist.evaluation.embedder import open_model
from sface_dist.evaluation.extraction import extract_views
from sface_dist.evaluation.image_sources import RecordImages
from sface_dist.parallel.collectives import gather_rows
from sface_dist.parallel.launch import DistEnv
from sface_dist.parallel.partition import even_split, even_split_sizes

DEFAULT_THRESHOLD = 0.5
"""Cosine to the mean of its identity's other images below which an image is a suspect even when no other
centre is nearer its own (chosen on one seed of the noise study, checked on two others: docs/noise.md)."""

DEFAULT_OUTLIER_MADS = 3.0
"""How many median absolute deviations below the median identity cosine makes an image an outlier of its label
(cleaning inside the run, chosen on the noise study: docs/noise.md)."""


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
        flagged = np.flatnonzero((self.nearest > self.own) | (self.identity < threshold))
        return flagged[np.argsort(self.own[flagged] - self.nearest[flagged], kind="stable")]

    def identity_outliers(self, mads: float = DEFAULT_OUTLIER_MADS, among: np.ndarray | None = None) -> np.ndarray:
        """Indices of the images whose identity cosine lies more than ``mads`` median absolute deviations below the
        median of the images ``among`` (a boolean mask; None: all), lowest first.

        Relative to the whole set rather than a fixed cosine, so that it holds early in a run, when every image is
        still near every other one and the head's centres do not yet tell identities apart."""
        usable = ~np.isnan(self.identity) & (True if among is None else among)
        values = self.identity[usable]
        if not len(values):
            return np.zeros(0, dtype=np.int64)
        median = float(np.median(values))
        spread = float(np.median(np.abs(values - median)))
        flagged = np.flatnonzero(usable & (self.identity < median - mads * spread))
        return flagged[np.argsort(self.identity[flagged], kind="stable")]


def score_labels(
    embeddings: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, block: int = 4096,
    identity_sums: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LabelScores:
    """Score ``embeddings [N, D]`` labelled ``labels [N]`` against class ``centres [C, D]`` (any scale), or
    ``[C, K, D]`` sub-centres, where a class's cosine is the largest of its K.

    ``identity_sums``: each class's sum of normalised embeddings [C, D] and image count [C] over a whole dataset
    of which these images are a part (sharded scoring); None: over these images.
    Works in blocks of ``block`` images and classes, so memory stays O(block²) at millions of each.
    """
    if embeddings.shape[0] != labels.shape[0] or embeddings.shape[1] != centres.shape[-1]:
        raise ValueError(f"shapes do not match: embeddings {tuple(embeddings.shape)}, labels "
                         f"{tuple(labels.shape)}, centres {tuple(centres.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= centres.shape[0]):
        raise ValueError(f"labels must lie in [0, {centres.shape[0]}), got [{labels.min()}, {labels.max()}]")
    x = F.normalize(embeddings.float(), dim=1)
    w = F.normalize(centres.float(), dim=-1)
    w = w if w.dim() == 3 else w.unsqueeze(1)
    own = torch.einsum("nd,nkd->nk", x, w[labels]).amax(dim=1)
    nearest = torch.full_like(own, -2.0)
    nearest_class = torch.zeros_like(labels)
    for start in range(0, len(x), block):
        rows = slice(start, start + block)
        for first in range(0, len(w), block):
            classes = w[first : first + block]
            cos = (x[rows] @ classes.flatten(0, 1).t()).view(-1, classes.shape[0], classes.shape[1]).amax(dim=2)
            local = labels[rows] - first
            inside = (local >= 0) & (local < cos.shape[1])
            cos[inside.nonzero().squeeze(1), local[inside]] = -2.0
            best, where = cos.max(dim=1)
            better = best > nearest[rows]
            nearest[rows] = torch.where(better, best, nearest[rows])
            nearest_class[rows] = torch.where(better, where + first, nearest_class[rows])
    if identity_sums is None:
        sums = torch.zeros(len(w), x.shape[1]).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=len(w))
    else:
        sums, counts = identity_sums
    others = F.normalize(sums[labels] - x, dim=1)
    identity = torch.where(counts[labels] > 1, (x * others).sum(dim=1), torch.nan)
    return LabelScores(own.numpy(), nearest.numpy(), nearest_class.numpy(), identity.numpy())


def write_suspects(
    out_dir: str | os.PathLike[str], keys: np.ndarray, labels: np.ndarray, scores: LabelScores, order: np.ndarray
) -> tuple[Path, Path, int]:
    """Write ``suspects.csv`` (the images ``order`` lists, in its order: most suspicious first), ``exclude.txt``
    (their keys, for ``repack --exclude``) and ``scores.npz`` (every image's key, label and scores, to apply another
    rule without embedding again)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, listing = out_dir / "suspects.csv", out_dir / "exclude.txt"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label", "own_cosine", "nearest_class", "nearest_cosine", "identity_cosine"])
        for i in order.tolist():
            writer.writerow([int(keys[i]), int(labels[i]), f"{scores.own[i]:.4f}", int(scores.nearest_class[i]),
                             f"{scores.nearest[i]:.4f}", f"{scores.identity[i]:.4f}"])
    listing.write_text("".join(f"{int(keys[i])}\n" for i in order.tolist()))
    np.savez(out_dir / "scores.npz", key=keys, label=labels, own=scores.own, nearest=scores.nearest,
             nearest_class=scores.nearest_class, identity=scores.identity)
    return table, listing, len(order)


@dataclass(frozen=True)
class FinderReport:
    """What ``find_noisy_labels`` wrote and found."""

    rec: Path
    images: int
    suspects: int
    table: Path
    listing: Path
    median_own: float


def find_noisy_labels(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    env: DistEnv,
    rec: str | os.PathLike[str] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 128,
    flip: bool = True,
    workers: int = 4,
    progress: TextIO | None = None,
) -> FinderReport | None:
    """Score every image of a run's dataset against the run's head and write the suspects (rank 0 returns).

    Each rank embeds a contiguous ``1/world_size`` of the images on ``env.device``; the embeddings and
    labels are all-gathered and rank 0 scores and writes. ``rec`` defaults to the run's ``data.root``.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    num_classes = head_classes(checkpoint)
    source = RecordImages(rec if rec is not None else read_model_config(checkpoint)[0]["data"]["root"])
    rec_path = source.reader.rec_path
    dataset_classes = known_num_classes(source.index)
    if dataset_classes is not None and dataset_classes != num_classes:
        raise CheckpointError(f"{checkpoint}: its head has {num_classes} classes, {rec_path} has {dataset_classes}")
    model = open_model(checkpoint, None, env.device)
    first, last = even_split(len(source), env.rank, env.world_size)
    views = extract_views(model.embed, lambda i: source.load(first + i), last - first, batch_size=batch_size,
                          flip=flip, workers=workers, progress=progress)
    local = torch.from_numpy(views.sum(axis=0)).to(env.device)
    labels = torch.from_numpy(source.labels[first:last]).to(env.device)
    sizes = even_split_sizes(len(source), env.world_size)
    embeddings = gather_rows(local, sizes, None).cpu()
    labels = gather_rows(labels, sizes, None).cpu()
    if not env.is_main:
        return None
    if int(labels.max()) >= num_classes:
        raise CheckpointError(
            f"{rec_path}: label {int(labels.max())} is outside the checkpoint's {num_classes} classes"
        )
    centres = read_head_rows(checkpoint)
    scores = score_labels(embeddings, labels, centres)
    table, listing, count = write_suspects(out_dir, source.keys, labels.numpy(), scores, scores.suspects(threshold))
    return FinderReport(rec_path, len(source), count, table, listing, float(np.median(scores.own)))
