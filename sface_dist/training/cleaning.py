"""Cleaning inside a run (``clean``): after chosen epochs, score every training image on the run's own ranks and
leave the suspects out of every later epoch, without a restart. Each cleaning takes its rule (``clean.rule``): the
identity outliers (early in a run) or the label-noise finder's rule (once the model is trained). The sub-centre
drop step (``head.sub_center_drop_epoch``) is the same kind of pass with sub-center ArcFace's rule.

Scoring is sharded: each rank embeds a contiguous ``1/world_size`` of the images with the current backbone (eval
mode, and the mirror with ``clean.flip``); the class sums of the normalised embeddings and the class counts are
all-reduced (each image's cosine to the mean of its identity's other images), the head's centres all-gathered
(each image's cosine to its own class and to the nearest other one), and the per-image scores all-gathered, so
that every rank takes the same suspects. Memory per rank: the centres and the class sums, O(classes · D), and
the scores, O(images); never every embedding.

The excluded images and the epochs already cleaned are part of the checkpoint (``CleaningState``): a resume, at
any world size or engine, trains on the same images. Rank 0 writes ``OUTPUT/cleaning/epoch-<E>/``:
``suspects.csv``, ``exclude.txt`` (record keys, for ``convert_rec.py repack --exclude``) and ``scores.npz``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from sface_dist.config import CleanConfig
from sface_dist.data.datasets import RecordFaceDataset, SyntheticFaceDataset
from sface_dist.data.errors import BadRecordError
from sface_dist.data.sampler import Sample
from sface_dist.data.torch_backend import normalise
from sface_dist.evaluation.noisy_labels import LabelScores, score_labels, write_suspects
from sface_dist.heads.sharded import ShardedHead
from sface_dist.parallel.collectives import gather_rows
from sface_dist.parallel.launch import DistEnv
from sface_dist.parallel.partition import class_range, even_split, even_split_sizes


@dataclass
class CleaningState:
    """What the run's cleanings and its sub-centre drop decided: the dataset indices left out, the epochs cleaned
    after, and the epoch after which the sub-centres were dropped (0: not dropped)."""

    excluded: np.ndarray
    cleaned_epochs: list[int]
    dropped_after: int = 0

    @classmethod
    def empty(cls) -> CleaningState:
        return cls(np.zeros(0, dtype=np.int64), [])

    def state_dict(self) -> dict[str, Any]:
        """``trainer.pt``'s ``cleaning``."""
        return {"cleaning": {"excluded": torch.from_numpy(self.excluded), "cleaned_epochs": list(self.cleaned_epochs),
                             "sub_centers_dropped_after": self.dropped_after}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint from before cleaning existed, or of a run that never cleaned, excludes nothing."""
        saved = state.get("cleaning")
        if saved is None:
            self.excluded, self.cleaned_epochs, self.dropped_after = CleaningState.empty().excluded, [], 0
            return
        excluded, epochs = saved.get("excluded"), saved.get("cleaned_epochs")
        dropped = saved.get("sub_centers_dropped_after", 0)
        if not isinstance(excluded, Tensor) or excluded.dim() != 1 or excluded.dtype != torch.int64:
            raise ValueError("cleaning.excluded: expected a 1-d int64 tensor of image indices")
        if not isinstance(epochs, list) or not all(isinstance(epoch, int) for epoch in epochs):
            raise ValueError("cleaning.cleaned_epochs: expected a list of epoch numbers")
        if not isinstance(dropped, int):
            raise ValueError("cleaning.sub_centers_dropped_after: expected an epoch number")
        self.excluded, self.cleaned_epochs, self.dropped_after = excluded.numpy().copy(), list(epochs), dropped


@dataclass(frozen=True)
class CleaningReport:
    """One cleaning's outcome, the same on every rank."""

    epoch: int
    scored: int
    suspects: np.ndarray
    """Dataset indices, most suspicious first."""
    newly_excluded: int
    folder: Path
    precision: float | None = None
    recall: float | None = None

    def line(self) -> str:
        planted = ("" if self.precision is None else
                   f"; against the planted noise: precision {self.precision:.3f}, recall {self.recall:.3f}")
        return (f"cleaning after epoch {self.epoch}: {len(self.suspects)} suspects of {self.scored} images, "
                f"{self.newly_excluded} newly left out of later epochs{planted} ({self.folder})")


def image_keys(dataset: RecordFaceDataset | SyntheticFaceDataset) -> np.ndarray:
    """Each image's record key (a synthetic image's index)."""
    if isinstance(dataset, RecordFaceDataset):
        return np.asarray(dataset.index.image_keys, dtype=np.int64)
    return np.arange(len(dataset), dtype=np.int64)


@torch.no_grad()
def embed_images(backbone: nn.Module, dataset: RecordFaceDataset | SyntheticFaceDataset, first: int, last: int,
                 batch_size: int, flip: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised embeddings [n, D] (image plus mirror with ``flip``), labels [n] and a readable flag [n] of images
    ``first .. last - 1``; a bad record is embedded as a black image and flagged unreadable."""
    black = np.zeros((dataset.image_size, dataset.image_size, 3), dtype=np.uint8)
    embeddings, labels, readable = [], [], []
    for start in range(first, last, batch_size):
        pixels = []
        for index in range(start, min(start + batch_size, last)):
            try:
                image, label = dataset[Sample(index, False)]
                readable.append(True)
            except BadRecordError:
                image, label = black, 0
                readable.append(False)
            pixels.append(image)
            labels.append(label)
        images = normalise(torch.from_numpy(np.stack(pixels))).to(device)
        out = backbone(images).float()
        if flip:
            out = out + backbone(images.flip(3)).float()
        embeddings.append(F.normalize(out, dim=1).cpu())
    dim = embeddings[0].shape[1] if embeddings else 0
    return (torch.cat(embeddings) if embeddings else torch.zeros(0, dim), torch.tensor(labels, dtype=torch.long),
            torch.tensor(readable, dtype=torch.bool))


def embed_share(backbone: nn.Module, dataset: RecordFaceDataset | SyntheticFaceDataset, share: tuple[int, int],
                cfg: CleanConfig, env: DistEnv, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``embed_images`` of images ``share`` (first, end: this rank's contiguous share), the backbone in eval mode
    meanwhile."""
    first, last = share
    was_training = backbone.training
    backbone.eval()
    try:
        local, labels, readable = embed_images(backbone, dataset, first, last, cfg.batch_size, cfg.flip, env.device)
    finally:
        backbone.train(was_training)
    return (local if len(local) else torch.zeros(0, dim)), labels, readable


def gather_centres(head: ShardedHead, env: DistEnv) -> Tensor:
    """Every class's centres, [C, K, D] on the CPU, from the shards of every rank."""
    sizes = [(end - start) * head.sub_centers for start, end in
             (class_range(head.num_classes, rank, env.world_size) for rank in range(env.world_size))]
    rows = gather_rows(head.weight.detach().float().contiguous(), sizes, None).cpu()
    return rows.view(head.num_classes, head.sub_centers, head.embedding_size)


def score_training_images(backbone: nn.Module, head: ShardedHead, dataset: RecordFaceDataset | SyntheticFaceDataset,
                          cfg: CleanConfig, env: DistEnv, excluded: np.ndarray | None = None,
                          ) -> tuple[LabelScores, np.ndarray, np.ndarray]:
    """Collective: the finder's scores of every image, its label, and whether it was readable (same on every
    rank). The identity means leave out the unreadable images and the dataset indices ``excluded``."""
    first, last = even_split(len(dataset), env.rank, env.world_size)
    local, labels, readable = embed_share(backbone, dataset, (first, last), cfg, env, head.embedding_size)
    classes, dim = head.num_classes, head.embedding_size
    counted = readable.clone()
    if excluded is not None and len(excluded):
        inside = excluded[(excluded >= first) & (excluded < last)] - first
        counted[torch.from_numpy(inside)] = False
    kept = counted.nonzero().squeeze(1)
    sums = torch.zeros(classes, dim).index_add_(0, labels[kept], local[kept])
    counts = torch.bincount(labels[kept], minlength=classes)
    if env.world_size > 1:
        totals = torch.cat([sums.flatten(), counts.to(sums.dtype)]).to(env.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
        sums, counts = totals[: classes * dim].view(classes, dim), totals[classes * dim :].round().long()
    scores = score_labels(local, labels, gather_centres(head, env), identity_sums=(sums, counts))
    sizes = even_split_sizes(len(dataset), env.world_size)
    columns = [torch.from_numpy(np.ascontiguousarray(column)).to(torch.float64) for column in
               (scores.own, scores.nearest, scores.nearest_class, scores.identity)]
    local_rows = torch.stack([*columns, labels.double(), readable.double()], dim=1).to(env.device)
    every = gather_rows(local_rows, sizes, None).cpu().numpy()
    own, nearest, nearest_class, identity, all_labels, all_readable = every.T
    unreadable = all_readable < 0.5
    own, nearest, identity = own.copy(), nearest.copy(), identity.copy()
    own[unreadable], nearest[unreadable], identity[unreadable] = 1.0, -1.0, np.nan
    gathered = LabelScores(own.astype(np.float32), nearest.astype(np.float32), nearest_class.astype(np.int64),
                           identity.astype(np.float32))
    return gathered, all_labels.astype(np.int64), ~unreadable


def planted_noise(manifest: str, keys: np.ndarray) -> np.ndarray:
    """Dataset indices of the images ``manifest`` (a ``corrupted.json``) lists as corrupted."""
    path = Path(manifest)
    try:
        records = json.loads(path.read_text())
        corrupted = {int(record["key"]) for record in records}
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"clean.corrupted: {path}: not a corrupted.json manifest ({error})") from None
    return np.flatnonzero(np.isin(keys, np.fromiter(corrupted, dtype=np.int64, count=len(corrupted))))


def clean(backbone: nn.Module, head: ShardedHead, dataset: RecordFaceDataset | SyntheticFaceDataset,
          cfg: CleanConfig, env: DistEnv, state: CleaningState, epoch: int, output: Path) -> CleaningReport:
    """Collective: score every image, add the suspects to ``state.excluded`` and record ``epoch`` as cleaned; rank
    0 writes the suspects under ``output/cleaning/epoch-<epoch>/``."""
    scores, labels, readable = score_training_images(backbone, head, dataset, cfg, env, state.excluded)
    if cfg.rule_after(epoch) == "outlier":
        kept = readable.copy()
        kept[state.excluded] = False
        suspects = scores.identity_outliers(cfg.mads, among=kept)
    else:
        suspects = scores.suspects(cfg.threshold)
    keys = image_keys(dataset)
    folder = output / "cleaning" / f"epoch-{epoch}"
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        write_suspects(folder, keys, labels, scores, suspects)
    before = len(state.excluded)
    state.excluded = np.union1d(state.excluded, suspects)
    state.cleaned_epochs.append(epoch)
    precision = recall = None
    if cfg.corrupted:
        planted = planted_noise(cfg.corrupted, keys)
        found = len(np.intersect1d(planted, suspects))
        precision = found / len(suspects) if len(suspects) else 1.0
        recall = found / len(planted) if len(planted) else 1.0
    return CleaningReport(epoch, len(dataset), suspects, len(state.excluded) - before, folder, precision, recall)


@dataclass(frozen=True)
class DropReport:
    """The sub-centre drop's outcome, the same on every rank."""

    epoch: int
    scored: int
    dominant_share: float
    """The share of the images nearest their class's dominant centre."""
    far: np.ndarray
    """Dataset indices farther than the angle from their class's dominant centre."""
    newly_excluded: int

    def line(self, degrees: float) -> str:
        return (f"sub-centres dropped after epoch {self.epoch}: each class keeps its dominant centre (nearest to "
                f"{self.dominant_share:.1%} of the {self.scored} images); {len(self.far)} images farther than "
                f"{degrees:g} degrees from it, {self.newly_excluded} newly left out of later epochs")


def dominant_centres(embeddings: Tensor, labels: Tensor, readable: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's cosines [n, K] to its class's centres ([C, K, D], normalised), and each class's count of
    readable images nearest each of its centres [C, K] (this rank's images)."""
    classes, k, _ = centres.shape
    cosines = torch.einsum("nd,nkd->nk", embeddings, centres[labels])
    nearest = cosines.argmax(dim=1)
    counts = torch.zeros(classes * k, dtype=torch.float64)
    counts.index_add_(0, (labels * k + nearest)[readable], torch.ones(int(readable.sum()), dtype=torch.float64))
    return cosines, counts.view(classes, k)


def drop_sub_centres(backbone: nn.Module, head: ShardedHead, optimizer: Any, dataset: RecordFaceDataset |
                     SyntheticFaceDataset, cfg: CleanConfig, degrees: float, env: DistEnv, state: CleaningState,
                     epoch: int) -> DropReport:
    """Collective: the drop step of sub-center ArcFace. Each class's dominant centre is the one most of its images
    are nearest (counts all-reduced; a tie goes to the lowest index); the images farther than ``degrees`` from
    their class's dominant centre join ``state.excluded``; the head and ``optimizer`` (a ``ShardOptimizer``) keep
    the dominant centre of each class and train on with one."""
    share = even_split(len(dataset), env.rank, env.world_size)
    local, labels, readable = embed_share(backbone, dataset, share, cfg, env, head.embedding_size)
    centres = F.normalize(gather_centres(head, env), dim=2)
    cosines, counts = dominant_centres(local, labels, readable, centres)
    if env.world_size > 1:
        counts = counts.to(env.device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    dominant = counts.argmax(dim=1)
    to_dominant = cosines.gather(1, dominant[labels].unsqueeze(1)).squeeze(1) if len(labels) else cosines[:, 0]
    nearest_is_dominant = (cosines.argmax(dim=1) == dominant[labels]) & readable
    far = (to_dominant < torch.cos(torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))).float()) & readable
    flags = torch.stack([far.double(), nearest_is_dominant.double()], dim=1).to(env.device)
    every = gather_rows(flags, even_split_sizes(len(dataset), env.world_size), None).cpu()
    far_images = np.flatnonzero(every[:, 0].numpy() > 0.5)
    before = len(state.excluded)
    state.excluded = np.union1d(state.excluded, far_images)
    state.dropped_after = epoch
    sub_centers = head.sub_centers
    which = dominant[head.class_start : head.class_end].to(head.weight.device)
    head.keep_centres(which)
    optimizer.keep_centres(which, sub_centers)
    return DropReport(epoch, len(dataset), float(every[:, 1].mean()) if len(every) else 1.0, far_images,
                      len(state.excluded) - before)
