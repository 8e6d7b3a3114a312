"""The studies' edits of a face dataset: a copy with known label noise, and a split by identity.

Both write flat datasets (keys ``0..n-1``, image bytes unchanged) whose files appear only once they are complete
(``atomic_files``), and the same inputs (and seed) give the same files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sface_dist.atomic_write import atomic_files
from sface_dist.data.dataset_checks import dataset_rec_path, known_num_classes, open_dataset, write_property
from sface_dist.data.errors import ConvertError
from sface_dist.data.images import image_shape
from sface_dist.data.recordio import IRHeader, RecordIOWriter, pack
from sface_dist.progress_bar import with_progress


@dataclass(frozen=True)
class CorruptedRecord:
    """One image of a noisy copy whose label is wrong: its key there, its label there, and the truth."""

    key: int
    noisy_label: int
    kind: str
    """``closed``: an image of the set relabelled to another identity; ``open``: an image of an identity
    outside the set (``source_key`` of ``outside``) given a label of the set."""
    true_label: int
    """The identity the image shows: a label of the set (closed) or of ``outside`` (open)."""
    source_key: int
    """The record key of the image in the file it came from."""


def add_label_noise(
    dataset: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    closed_fraction: float = 0.0,
    open_fraction: float = 0.0,
    outside: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[CorruptedRecord]:
    """Write a copy of ``dataset`` (its folder or ``.rec``) with label noise (flat layout, keys ``0..n-1``) and
    return the noise.

    Closed-set noise relabels ``closed_fraction`` of the images, chosen uniformly, to another identity
    drawn uniformly. Open-set noise adds ``open_fraction·n`` images of ``outside`` (a dataset of other
    identities), each given a label of the set drawn uniformly. Image bytes are copied unchanged and
    the records shuffled by ``seed``, so the noisy images are not grouped.
    """
    if not 0.0 <= closed_fraction <= 1.0 or not 0.0 <= open_fraction:
        raise ConvertError(f"noise fractions must be in [0, 1] (closed) and >= 0 (open), got {closed_fraction}, "
                           f"{open_fraction}")
    if open_fraction and outside is None:
        raise ConvertError("open-set noise needs a dataset of other identities (outside)")
    rng = np.random.default_rng(seed)
    rec_path, out_dir = dataset_rec_path(dataset), Path(out_dir)
    with open_dataset(rec_path) as index:
        num_classes = known_num_classes(index)
        images = [index.read(position) + (index.key(position),) for position in range(len(index))]
    num_classes = num_classes if num_classes is not None else 1 + max(label for label, _, _ in images)
    if num_classes < 2 and closed_fraction:
        raise ConvertError(f"{rec_path}: closed-set noise needs at least 2 identities")
    # (shown label, image, kind, true label, source key)
    entries = [(label, image, "", label, key) for label, image, key in images]
    for position in rng.choice(len(entries), round(closed_fraction * len(entries)), replace=False).tolist():
        label, image, _, _, key = entries[position]
        noisy = (label + int(rng.integers(1, num_classes))) % num_classes
        entries[position] = (noisy, image, "closed", label, key)
    if open_fraction:
        with open_dataset(dataset_rec_path(outside)) as other:
            count = round(open_fraction * len(entries))
            if count > len(other):
                raise ConvertError(f"{outside}: {len(other)} images cannot supply {count} open-set images")
            for position in rng.choice(len(other), count, replace=False).tolist():
                true_label, image = other.read(position)
                noisy = int(rng.integers(0, num_classes))
                entries.append((noisy, image, "open", true_label, other.key(position)))
    order = rng.permutation(len(entries)).tolist()
    corrupted: list[CorruptedRecord] = []
    with atomic_files(out_dir, ("train.rec", "train.idx", "property")) as files:
        with RecordIOWriter(files["train.rec"], files["train.idx"]) as writer:
            for key, position in enumerate(with_progress(order, len(order), progress)):
                label, image, kind, true_label, source_key = entries[position]
                writer.write(key, pack(IRHeader(0, float(label), key, 0), image))
                if kind:
                    corrupted.append(CorruptedRecord(key, label, kind, true_label, source_key))
        write_property(files["property"], num_classes, image_shape(images[0][1]))
    return corrupted


def hold_out_identities(
    dataset: str | os.PathLike[str], out_dir: str | os.PathLike[str], count: int, progress: bool = True
) -> tuple[Path, Path]:
    """Split ``dataset`` (its folder or ``.rec``) by identity into ``out_dir/kept`` and ``out_dir/outside``
    (flat layout, keys ``0..n-1``).

    The last ``count`` identities go to ``outside``, relabelled from 0; the others keep their labels in
    ``kept``. Open-set noise (``add_label_noise``) then draws from identities the kept set does not have.
    """
    rec_path, out_dir = dataset_rec_path(dataset), Path(out_dir)
    with open_dataset(rec_path) as index:
        num_classes = known_num_classes(index)
        if num_classes is None:
            num_classes = 1 + max(index.read(position)[0] for position in range(len(index)))
        if not 1 <= count < num_classes:
            raise ConvertError(f"{rec_path}: cannot hold out {count} of its {num_classes} identities")
        first_outside = num_classes - count
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(atomic_files(out_dir / name, ("train.rec", "train.idx", "property")))
                     for name in ("kept", "outside")}  # fmt: skip
            writers = {name: stack.enter_context(RecordIOWriter(paths["train.rec"], paths["train.idx"]))
                       for name, paths in files.items()}  # fmt: skip
            written, shape = dict.fromkeys(files, 0), None
            for position in with_progress(range(len(index)), len(index), progress):
                label, image = index.read(position)
                name, offset = ("outside", first_outside) if label >= first_outside else ("kept", 0)
                key = written[name]
                writers[name].write(key, pack(IRHeader(0, float(label - offset), key, 0), image))
                written[name] += 1
                shape = shape or image_shape(image)
            write_property(files["kept"]["property"], first_outside, shape)
            write_property(files["outside"]["property"], count, shape)
    return out_dir / "kept" / "train.rec", out_dir / "outside" / "train.rec"
