"""Build, rewrite and export RecordIO face datasets: the library behind ``tools/convert_rec.py``.

Every function writes its outputs under temporary names in the destination folder and
renames them into place only when everything succeeded, so a failed or interrupted run
leaves an existing dataset untouched. Images are decoded and encoded on a pool of worker
processes, a few chunks in flight at a time, so memory stays flat on datasets of any size.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sface_dist.atomic_write import atomic_files, atomic_folder
from sface_dist.data.dataset_checks import (
    dataset_rec_path,
    known_num_classes,
    open_dataset,
    read_checked,
    write_property,
)
from sface_dist.data.errors import BadRecordError, ConvertError
from sface_dist.data.images import encode_jpeg, image_extension, image_shape
from sface_dist.data.recordio import (
    FaceRecordIndex,
    FaceRecordWriter,
    IRHeader,
    RecordIOError,
    RecordIOWriter,
    pack,
)
from sface_dist.process_pool import map_chunks
from sface_dist.progress_bar import with_progress

_DATASET_FILES = ("train.rec", "train.idx", "property", "classes.txt")


@dataclass(frozen=True)
class EncodeOptions:
    """How source images become stored bytes.

    ``image_size``: square side to resize to (None keeps every image's size). ``quality``:
    JPEG quality. ``pass_through``: store a JPEG or PNG file's bytes unchanged when it
    already has the target size, instead of decoding and re-encoding it.
    """

    image_size: int | None = 112
    quality: int = 95
    pass_through: bool = False


@dataclass
class ConvertSummary:
    """What a conversion wrote and what it left out."""

    out: Path
    num_images: int
    num_classes: int
    bytes_written: int
    seconds: float
    skipped: list[str] = field(default_factory=list)
    excluded: int = 0
    """Records left out because an exclusion list named them."""

    def describe(self, verb: str = "wrote") -> str:
        rate = self.num_images / max(self.seconds, 1e-9)
        line = (
            f"{verb} {self.out} ({self.bytes_written / 2**20:.1f} MiB): {self.num_images} images of "
            f"{self.num_classes} identities in {self.seconds:.1f} s ({rate:,.0f} img/s)"
        )
        if self.excluded:
            line += f"; excluded {self.excluded} listed records"
        if self.skipped:
            line += f"; skipped {len(self.skipped)} bad records:\n  " + "\n  ".join(self.skipped)
        return line


def folder_to_rec(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: EncodeOptions = EncodeOptions(),
    shuffle: bool = False,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> ConvertSummary:
    """Encode ``root/<identity>/<image>`` as ``out_dir/train.rec``, ``train.idx``, ``property``, ``classes.txt``.

    Identities are the sub-folders of ``root`` in sorted order (labels ``0..N-1``, names in
    ``classes.txt``). Without ``shuffle`` the insightface layout is written; with it, the
    images go in a ``seed``-determined random order into the flat layout (identity records
    cannot describe a shuffled file), which is what DALI's own reader wants.
    """
    start_time = time.perf_counter()
    root, out_dir = Path(root), Path(out_dir)
    identities = _list_identities(root)
    labelled = [(label, path) for label, (_, images) in enumerate(identities) for path in images]
    if shuffle:
        labelled = [labelled[i] for i in np.random.default_rng(seed).permutation(len(labelled)).tolist()]
    sizes = None if shuffle else [len(images) for _, images in identities]
    with atomic_files(out_dir, _DATASET_FILES) as files:
        try:
            writer = FaceRecordWriter(files["train.rec"], files["train.idx"], sizes)
        except RecordIOError as error:
            raise ConvertError(f"{error} (--shuffle writes it)") from None
        with writer:
            encoded = map_chunks(_encode_chunk, [path for _, path in labelled], (options,), workers)
            shape = None
            pairs = zip(labelled, encoded, strict=True)
            for (label, _), (jpeg, encoded_shape) in with_progress(pairs, len(labelled), progress):
                shape = shape or encoded_shape
                writer.write(label, jpeg)
        write_property(files["property"], len(identities), shape)
        files["classes.txt"].write_text("".join(f"{name}\n" for name, _ in identities), encoding="utf-8")
    return ConvertSummary(
        out_dir, len(labelled), len(identities), _size(out_dir / "train.rec"), time.perf_counter() - start_time
    )


def list_to_rec(
    list_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: EncodeOptions = EncodeOptions(),
    progress: bool = True,
    workers: int | None = None,
) -> ConvertSummary:
    """Encode an im2rec ``.lst`` (``index<TAB>label[<TAB>label...]<TAB>relative path``) as a flat dataset.

    As im2rec does, record keys and header ids are the list's indices and the records follow
    the list's order; several labels make a multi-label record (the first is the class).
    """
    start_time = time.perf_counter()
    list_path, root, out_dir = Path(list_path), Path(root), Path(out_dir)
    entries = _read_list(list_path)
    num_classes = 1 + max(int(labels[0]) for _, labels, _ in entries)
    with atomic_files(out_dir, ("train.rec", "train.idx", "property")) as files:
        with RecordIOWriter(files["train.rec"], files["train.idx"]) as writer:
            paths = [root / relative for _, _, relative in entries]
            encoded = map_chunks(_encode_chunk, paths, (options,), workers)
            shape = None
            pairs = zip(entries, encoded, strict=True)
            for (index, labels, _), (image, encoded_shape) in with_progress(pairs, len(entries), progress):
                shape = shape or encoded_shape
                label: float | tuple[float, ...] = labels[0] if len(labels) == 1 else tuple(labels)
                writer.write(index, pack(IRHeader(0, label, index, 0), image))
        write_property(files["property"], num_classes, shape)
    return ConvertSummary(
        out_dir, len(entries), num_classes, _size(out_dir / "train.rec"), time.perf_counter() - start_time
    )


def read_exclusions(list_path: str | os.PathLike[str]) -> set[int]:
    """Record keys listed in ``list_path``: the first comma- or space-separated field of each line;
    blank lines, ``#`` comments and a header line whose first field is ``key`` are passed over."""
    list_path = Path(list_path)
    try:
        lines = list_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConvertError(f"{list_path}: cannot read the exclusion list ({error})") from None
    keys: set[int] = set()
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields or (number == 1 and fields[0] == "key"):
            continue
        try:
            keys.add(int(fields[0]))
        except ValueError:
            raise ConvertError(f"{list_path}: line {number}: {fields[0]!r} is not a record key") from None
    return keys


def repack(
    dataset: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    shuffle: bool = True,
    seed: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    exclude: str | os.PathLike[str] | None = None,
) -> ConvertSummary:
    """Rewrite any face dataset (its folder or ``.rec``) as a flat, images-only file with scalar labels
    (keys ``0..n-1``).

    Image bytes are copied unchanged; with ``shuffle`` they go in a ``seed``-determined random
    order. Records that cannot be read, carry no recognisable image or a label outside the
    class range stop the run, or with ``skip_bad`` are left out and listed in the summary.
    ``exclude`` names a list of record keys to leave out (``read_exclusions``); a key that is
    not an image record of the source is an error, so a list made for another file is caught.
    ``property`` and ``classes.txt`` next to the source are carried over.
    """
    start_time = time.perf_counter()
    rec_path, out_dir = dataset_rec_path(dataset), Path(out_dir)
    with open_dataset(rec_path) as index:
        num_classes = known_num_classes(index)
        order = np.random.default_rng(seed).permutation(len(index)) if shuffle else np.arange(len(index))
        if exclude is not None:
            order = _without_excluded(order, index, rec_path, Path(exclude))
        skipped: list[str] = []
        written = 0
        max_label = -1
        shape = None
        with atomic_files(out_dir, _DATASET_FILES) as files:
            with RecordIOWriter(files["train.rec"], files["train.idx"]) as writer:
                for position in with_progress(order.tolist(), len(order), progress):
                    try:
                        label, image = read_checked(index, position, num_classes)
                    except BadRecordError as error:
                        if not skip_bad:
                            raise
                        skipped.append(str(error))
                        continue
                    writer.write(written, pack(IRHeader(0, float(label), written, 0), image))
                    written += 1
                    max_label = max(max_label, label)
                    shape = shape or image_shape(image)
            num_classes = num_classes if num_classes is not None else max_label + 1
            write_property(files["property"], num_classes, shape)
            classes = rec_path.with_name("classes.txt")
            if classes.is_file():
                shutil.copyfile(classes, files["classes.txt"])
        if not classes.is_file():
            (out_dir / "classes.txt").unlink(missing_ok=True)
    return ConvertSummary(
        out_dir, written, num_classes, _size(out_dir / "train.rec"), time.perf_counter() - start_time, skipped,
        excluded=len(index) - len(order),
    )


def _without_excluded(order: np.ndarray, index: FaceRecordIndex, rec_path: Path, list_path: Path) -> np.ndarray:
    """``order`` without the image positions whose keys ``list_path`` names; unknown keys are an error."""
    excluded = read_exclusions(list_path)
    keys = index.image_keys
    unknown = sorted(excluded - set(keys.tolist()))
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise ConvertError(f"{list_path}: {len(unknown)} keys are not image records of {rec_path}: {shown}")
    return order[~np.isin(keys[order], np.fromiter(excluded, dtype=np.int64, count=len(excluded)))]


def rec_to_folder(
    dataset: str | os.PathLike[str], out_dir: str | os.PathLike[str], progress: bool = True
) -> ConvertSummary:
    """Extract every image of ``dataset`` (its folder or ``.rec``) as ``out_dir/<identity>/<key>.<ext>`` (bytes
    unchanged).

    Identity folders are named from ``classes.txt`` next to the ``.rec`` when there is one (each line one folder
    name: no separator, no ``.`` or ``..``, no repeat), else by zero-padded label. ``out_dir`` must not exist or be
    empty: it is built under a temporary name and renamed into place, and nothing of the user's is replaced.
    """
    start_time = time.perf_counter()
    rec_path, out_dir = dataset_rec_path(dataset), Path(out_dir).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConvertError(f"{out_dir}: exists and is not an empty folder: to-folder writes a new folder "
                           "(choose another, or remove this one yourself)")
    with open_dataset(rec_path) as index:
        classes_path = rec_path.with_name("classes.txt")
        names = _identity_names(classes_path) if classes_path.is_file() else None
        labels: set[int] = set()
        written = 0
        with atomic_folder(out_dir) as staging:
            for position in with_progress(range(len(index)), len(index), progress):
                key = index.key(position)
                label, image = read_checked(index, position, None)
                if names is not None and not 0 <= label < len(names):
                    raise ConvertError(f"{index.reader.location(key)}: label {label} has no line in {classes_path}")
                folder = staging / (names[label] if names is not None else f"{label:07d}")
                if label not in labels:
                    folder.mkdir(parents=True, exist_ok=True)
                    labels.add(label)
                (folder / f"{key}{image_extension(image)}").write_bytes(image)
                written += len(image)
    return ConvertSummary(out_dir, len(index), len(labels), written, time.perf_counter() - start_time)


def pair_list(root: str | os.PathLike[str], count: int, seed: int = 0) -> list[tuple[str, str, bool]]:
    """``count`` distinct verification pairs of the identity folders under ``root``, half of one identity and half
    of two, alternating (so that every fold of an even size holds as many of each), drawn with ``seed``.

    Paths are relative to ``root``; a path with white space, which ``make_bin``'s ``path_a path_b 1|0`` lines
    cannot hold, is refused in one line, and so is a folder that has fewer distinct pairs of a kind than asked.
    """
    root = Path(root)
    if count < 2 or count % 2:
        raise ConvertError(f"--pairs {count}: an even number >= 2 (half of one identity, half of two)")
    identities = [[image.relative_to(root).as_posix() for image in images] for _, images in _list_identities(root)]
    for images in identities:
        spaced = next((name for name in images if len(name.split()) != 1), None)
        if spaced is not None:
            raise ConvertError(f"{root / spaced}: white space in the path, which a pair line cannot hold: rename it")
    half = count // 2
    same_total = sum(len(images) * (len(images) - 1) // 2 for images in identities)
    sizes = [len(images) for images in identities]
    different_total = (sum(sizes) ** 2 - sum(size**2 for size in sizes)) // 2
    for kind, total in (("of one identity", same_total), ("of two identities", different_total)):
        if total < half:
            raise ConvertError(f"{root}: {len(identities)} identities hold {total} distinct pairs {kind}, fewer "
                               f"than the {half} asked for: ask for fewer, or add images")
    rng = np.random.default_rng(seed)
    several = [images for images in identities if len(images) > 1]
    same: dict[tuple[str, str], None] = {}
    while len(same) < half:
        images = several[rng.integers(len(several))]
        first, second = rng.choice(len(images), 2, replace=False)
        same.setdefault(tuple(sorted((images[first], images[second]))), None)
    different: dict[tuple[str, str], None] = {}
    while len(different) < half:
        one, other = rng.choice(len(identities), 2, replace=False)
        pair = identities[one][rng.integers(sizes[one])], identities[other][rng.integers(sizes[other])]
        different.setdefault(tuple(sorted(pair)), None)
    alternating = zip(((*pair, True) for pair in same), ((*pair, False) for pair in different), strict=True)
    return [pair for both in alternating for pair in both]


def make_bin(
    pairs_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    options: EncodeOptions = EncodeOptions(),
    progress: bool = True,
    workers: int | None = None,
) -> ConvertSummary:
    """Write an insightface verification pack from a pair list.

    Each line of ``pairs_path`` is ``path_a path_b same`` (paths relative to ``root``,
    ``same`` one of 1/0/true/false); blank lines and ``#`` comments are ignored.
    """
    from sface_dist.data.bin_pack import write_bin  # imports torch, which only make-bin needs

    start_time = time.perf_counter()
    pairs_path, root, out_path = Path(pairs_path), Path(root), Path(out_path)
    pairs = _read_pairs(pairs_path)
    paths = [root / relative for first, second, _ in pairs for relative in (first, second)]
    results = map_chunks(_encode_chunk, paths, (options,), workers)
    encoded = [image for image, _ in with_progress(results, len(paths), progress)]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_bin(out_path, encoded, [same for _, _, same in pairs])
    return ConvertSummary(out_path, len(paths), 0, _size(out_path), time.perf_counter() - start_time)


def _encode_chunk(paths: Sequence[Path], options: EncodeOptions) -> list[tuple[bytes, tuple[int, int]]]:
    """Stored bytes and ``(height, width)`` of each image file (runs in a worker process)."""
    return [_encode_file(path, options) for path in paths]


def _encode_file(path: Path, options: EncodeOptions) -> tuple[bytes, tuple[int, int]]:
    try:
        with Image.open(path) as opened:
            target = options.image_size
            keeps_size = target is None or opened.size == (target, target)
            if options.pass_through and keeps_size and opened.format in ("JPEG", "PNG") and opened.mode == "RGB":
                return path.read_bytes(), (opened.height, opened.width)
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise ConvertError(f"{path}: cannot read image ({error})") from None
    if not keeps_size:
        image = image.resize((target, target), Image.Resampling.BICUBIC)  # type: ignore[arg-type]
    return encode_jpeg(image, options.quality), (image.height, image.width)


def _folder_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one folder inside the output (None when it can)."""
    if name in ("", ".", ".."):
        return "not a folder name"
    if "/" in name or "\0" in name:
        return "holds a path separator"
    if "\n" in name or "\r" in name:
        return "holds a line break"
    return None


def _identity_names(classes_path: Path) -> list[str]:
    """The identity names of ``classes.txt``, one per line, each checked to be one folder name, none repeated."""
    names = classes_path.read_text(encoding="utf-8").splitlines()
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        problem = _folder_name_problem(name)
        if problem is not None:
            raise ConvertError(f"{classes_path}: line {number}: identity {name!r} is {problem}: refused")
        if name in seen:
            raise ConvertError(f"{classes_path}: line {number}: identity {name!r} repeats line {seen[name]}")
        seen[name] = number
    return names


def _list_identities(root: Path) -> list[tuple[str, list[Path]]]:
    """Sorted identity folders of ``root`` with their sorted image files."""
    if not root.is_dir():
        raise ConvertError(f"{root}: not a directory")
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    identities = []
    for folder in sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")):
        images = sorted(
            entry
            for entry in folder.iterdir()
            if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in extensions
        )
        if not images:
            raise ConvertError(f"{folder}: identity folder holds no images")
        if (problem := _folder_name_problem(folder.name)) is not None:
            raise ConvertError(f"{root}: identity folder name {folder.name!r} {problem}: classes.txt holds one "
                               "name per line (rename the folder)")
        identities.append((folder.name, images))
    if not identities:
        raise ConvertError(f"{root}: no identity sub-folders")
    return identities


def _read_list(list_path: Path) -> list[tuple[int, list[float], str]]:
    """Entries of an im2rec ``.lst`` file; errors name the line."""
    if not list_path.is_file():
        raise ConvertError(f"{list_path}: list file not found")
    entries = []
    for number, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        try:
            if len(fields) < 3:
                raise ValueError
            entries.append((int(fields[0]), [float(value) for value in fields[1:-1]], fields[-1]))
        except ValueError:
            raise ConvertError(f"{list_path}: line {number} is not 'index<TAB>label<TAB>path': {line[:80]!r}") from None
    if not entries:
        raise ConvertError(f"{list_path}: no entries")
    indices = [index for index, _, _ in entries]
    if len(set(indices)) != len(indices):
        raise ConvertError(f"{list_path}: image indices repeat (they become record keys)")
    bad = next((entry for entry in entries if entry[1][0] < 0 or entry[1][0] != int(entry[1][0])), None)
    if bad is not None:
        raise ConvertError(f"{list_path}: index {bad[0]} has label {bad[1][0]}, expected a class number >= 0")
    return entries


def _read_pairs(pairs_path: Path) -> list[tuple[str, str, bool]]:
    """``(path_a, path_b, same)`` of a pair list; errors name the line."""
    if not pairs_path.is_file():
        raise ConvertError(f"{pairs_path}: pair list not found")
    truth = {"1": True, "true": True, "0": False, "false": False}
    pairs = []
    for number, line in enumerate(pairs_path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3 or fields[2].lower() not in truth:
            raise ConvertError(f"{pairs_path}: line {number} is not 'path_a path_b 1|0': {line[:80]!r}")
        pairs.append((fields[0], fields[1], truth[fields[2].lower()]))
    if not pairs:
        raise ConvertError(f"{pairs_path}: no pairs")
    return pairs


def _size(path: Path) -> int:
    return path.stat().st_size
