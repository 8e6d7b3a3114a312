"""What every reader of a face dataset checks the same way: which files a dataset is, how many
classes it has, and whether a record is usable.

The loaders, the converter and ``inspect`` share these checks, so a dataset means the same, and
a bad record gets the same one-line ``DataError`` naming the file, key and offset, whichever reads it.
The tools that rewrite a dataset open it with ``open_dataset`` and write the ``property`` file that
``read_property`` checks with ``write_property``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sface_dist.data.errors import BadRecordError, DataError
from sface_dist.data.images import image_extension
from sface_dist.data.recordio import FaceRecordIndex, RecordIOError, RecordIOReader

REC_NAME = "train.rec"
"""The ``.rec`` of a dataset folder (``train.idx`` and ``property`` lie next to it)."""


def dataset_rec_path(dataset: str | os.PathLike[str]) -> Path:
    """The ``.rec`` of a dataset named by its folder (holding ``train.rec``, ``train.idx``) or by the ``.rec``."""
    path = Path(dataset)
    if not path.exists():
        raise DataError(f"{path}: no such dataset folder or .rec file")
    if path.is_dir():
        if not (path / REC_NAME).is_file():
            raise DataError(f"{path}: the dataset folder holds no {REC_NAME}")
        return path / REC_NAME
    if path.suffix != ".rec":
        raise DataError(f"{path}: expected a dataset folder (holding {REC_NAME}, train.idx) or a .rec file")
    return path


def read_property(path: Path) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` of an insightface ``property`` file."""
    text = path.read_text(errors="replace").strip()
    try:
        num_classes, height, width = (int(value) for value in text.split(","))
    except ValueError:
        raise DataError(f"{path}: expected 'num_classes,height,width', got {text[:80]!r}") from None
    if min(num_classes, height, width) < 1:
        raise DataError(f"{path}: expected 'num_classes,height,width' of positive numbers, got {text[:80]!r}")
    return num_classes, height, width


def write_property(path: Path, num_classes: int, shape: tuple[int, int] | None) -> None:
    """Write ``num_classes,height,width`` to ``path`` (``0,0`` for a shape no image told)."""
    height, width = shape or (0, 0)
    path.write_text(f"{num_classes},{height},{width}\n")


@contextlib.contextmanager
def open_dataset(rec_path: Path) -> Iterator[FaceRecordIndex]:
    """The image index of ``rec_path`` (its ``.idx`` alongside), open while in use; an empty dataset is an error."""
    with RecordIOReader(rec_path, rec_path.with_suffix(".idx")) as reader:
        index = FaceRecordIndex(reader)
        index.require_images()
        yield index


def known_num_classes(index: FaceRecordIndex) -> int | None:
    """The class count that the ``property`` file next to the ``.rec`` or its identity records state.

    They must agree; None when neither states one (a flat dataset without ``property``).
    """
    rec_path = index.reader.rec_path
    property_path = rec_path.with_name("property")
    stated = read_property(property_path)[0] if property_path.is_file() else None
    if stated is not None and index.num_classes is not None and stated != index.num_classes:
        raise DataError(
            f"{property_path} says {stated} classes, the identity records of {rec_path} say {index.num_classes}"
        )
    return stated if stated is not None else index.num_classes


def resolve_num_classes(index: FaceRecordIndex, configured: int, image_size: int) -> int:
    """The class count to train with: the dataset's (``known_num_classes``), else ``configured``.

    A configured count (non-zero) must agree with the dataset's, and ``image_size`` with its ``property`` file.
    """
    rec_path = index.reader.rec_path
    property_path = rec_path.with_name("property")
    known = known_num_classes(index)
    if property_path.is_file():
        if configured and configured != known:
            raise DataError(f"data.num_classes={configured} disagrees with {property_path} ({known} classes)")
        _, height, width = read_property(property_path)
        if (height, width) != (image_size, image_size):
            raise DataError(f"data.image_size={image_size} disagrees with {property_path} ({height}x{width} images)")
    elif configured and known is not None and configured != known:
        raise DataError(f"data.num_classes={configured} disagrees with the {known} identity records of {rec_path}")
    if known is not None:
        return known
    if configured:
        return configured
    raise DataError(f"{rec_path.parent}: no property file and no identity records: set data.num_classes")


def read_checked(index: FaceRecordIndex, position: int, num_classes: int | None) -> tuple[int, bytes]:
    """Label and encoded bytes of image ``position``, read and checked (``check_record``) without decoding.

    A record that does not frame and unpack, or whose label is not a whole number, is a ``BadRecordError`` too.
    """
    try:
        label, encoded = index.read(position)
    except RecordIOError as error:
        raise BadRecordError(str(error)) from None
    check_record(index, position, label, encoded, num_classes)
    return label, encoded


def check_record(index: FaceRecordIndex, position: int, label: int, encoded: bytes, num_classes: int | None) -> None:
    """Raise ``BadRecordError`` naming the record unless ``label`` is in ``[0, num_classes)`` (any when
    ``num_classes`` is None) and ``encoded`` starts with a JPEG, PNG or BMP signature."""
    if num_classes is not None and not 0 <= label < num_classes:
        raise BadRecordError(f"{record_location(index, position)}: label {label} outside [0, {num_classes})")
    if not image_extension(encoded):
        raise BadRecordError(
            f"{record_location(index, position)}: payload of {len(encoded)} bytes is not a JPEG, PNG or BMP"
        )


def record_location(index: FaceRecordIndex, position: int) -> str:
    """``FILE: key K at offset O`` of image ``position``, the prefix of every message about that record."""
    return index.reader.location(index.key(position))
