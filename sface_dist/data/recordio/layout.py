"""The two layouts of a face dataset in RecordIO, read by ``FaceRecordIndex`` and written by ``FaceRecordWriter``.

insightface's: record 0 with labels ``(first identity key, end key)``, images at keys
``1..first-1`` grouped by identity, identity records holding their ``[start, end)`` image key
range. im2rec's flat one: every record is an image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType

import numpy as np

from sface_dist.data.recordio.framing import RecordIOError
from sface_dist.data.recordio.image_header import IRHeader, first_label, pack, unpack
from sface_dist.data.recordio.reader import RecordIOReader
from sface_dist.data.recordio.writer import RecordIOWriter

MAX_EXACT_KEY = 2**24
"""insightface's header and identity records store keys as float32 labels, exact only up to 2**24."""


def header_record(first_identity_key: int, end_key: int) -> bytes:
    """insightface's record 0: labels ``(first identity key, end key)``, no image."""
    return pack(IRHeader(0, (float(first_identity_key), float(end_key)), 0, 0), b"")


def identity_record(start: int, end: int) -> bytes:
    """insightface's identity record: the ``[start, end)`` key range of its images."""
    return pack(IRHeader(0, (float(start), float(end)), 0, 0), b"")


def image_record(key: int, label: int, image: bytes) -> bytes:
    """An image record with a scalar label and the key as header id (as im2rec writes them)."""
    return pack(IRHeader(0, float(label), key, 0), image)


class FaceRecordWriter:
    """Writes a face dataset in the insightface layout, or flat when ``identity_sizes`` is None.

    insightface: ``identity_sizes[c]`` images of class ``c`` follow record 0 in class order
    (keys ``1..n``), then one identity record per class. Flat: images only, keys ``0..n-1``
    in the order written (the layout DALI's ``fn.readers.mxnet`` and im2rec use).
    """

    def __init__(
        self,
        rec_path: str | os.PathLike[str],
        idx_path: str | os.PathLike[str],
        identity_sizes: Sequence[int] | None,
    ) -> None:
        self._writer = RecordIOWriter(rec_path, idx_path)
        self._sizes = None if identity_sizes is None else np.asarray(identity_sizes, dtype=np.int64)
        self.num_written = 0
        if self._sizes is None:
            self._next_key = 0
            return
        num_images = int(self._sizes.sum())
        end_key = num_images + 1 + len(self._sizes)
        if end_key > MAX_EXACT_KEY:
            raise RecordIOError(
                f"{rec_path}: {num_images} images of {len(self._sizes)} identities exceed the {MAX_EXACT_KEY} keys "
                "that insightface's float32 header record can address exactly: use the flat layout"
            )
        self._label_ends = np.cumsum(self._sizes)
        self._next_key = 1
        self._writer.write(0, header_record(num_images + 1, end_key))

    def write(self, label: int, image: bytes) -> int:
        """Append one image; returns its key. insightface layout: labels must come in class order."""
        if self._sizes is not None:
            expected = int(np.searchsorted(self._label_ends, self.num_written, side="right"))
            if label != expected:
                raise RecordIOError(
                    f"{self._writer.rec_path}: image {self.num_written} has label {label}, but the identity sizes "
                    f"place class {expected} there (insightface layout writes images grouped by class)"
                )
        key = self._next_key
        self._writer.write(key, image_record(key, label, image))
        self._next_key += 1
        self.num_written += 1
        return key

    def close(self) -> None:
        """Write the identity records (insightface layout) and close both files."""
        try:
            if self._sizes is not None:
                if self.num_written != int(self._sizes.sum()):
                    raise RecordIOError(
                        f"{self._writer.rec_path}: {self.num_written} images written, identity sizes add up to "
                        f"{int(self._sizes.sum())}"
                    )
                start = 1
                for label, size in enumerate(self._sizes.tolist()):
                    self._writer.write(self._next_key + label, identity_record(start, start + size))
                    start += size
        finally:
            self._writer.close()

    def __enter__(self) -> FaceRecordWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()


class FaceRecordIndex:
    """The image records of a face ``.rec`` as insightface lays them out, or as im2rec does.

    insightface: record 0 has ``flag > 0``, labels ``(first identity key, end key)`` and no
    image; images are keys ``1 .. first identity key - 1`` and each identity record holds its
    ``[start, end)`` image key range, so ``num_classes = end key - first identity key``.
    Flat (im2rec): every key is an image and ``num_classes`` is unknown (``None``).
    """

    def __init__(self, reader: RecordIOReader) -> None:
        self.reader = reader
        self.layout = "flat"
        self.num_classes: int | None = None
        self.first_identity_key: int | None = None
        self._flat_keys: np.ndarray | None = reader.key_array
        self._num_images = len(reader)
        header, payload = self._unpack(0) if 0 in reader else (None, b"")
        if header is None or header.flag == 0 or payload:
            return
        labels = header.label
        assert isinstance(labels, tuple)
        if len(labels) < 2:
            raise RecordIOError(f"{reader.location(0)}: insightface header record needs 2 labels, has {header.flag}")
        if not all(float(label).is_integer() for label in labels[:2]):
            raise RecordIOError(f"{reader.location(0)}: header labels ({labels[0]}, {labels[1]}) are not a key range")
        first_identity, end = int(labels[0]), int(labels[1])
        if first_identity < 1 or end < first_identity:
            raise RecordIOError(f"{reader.location(0)}: header labels ({first_identity}, {end}) are not a key range")
        if first_identity > 1 and first_identity - 1 not in reader:
            raise RecordIOError(
                f"{reader.idx_path}: header record says images are keys 1..{first_identity - 1}, "
                f"but key {first_identity - 1} is missing"
            )
        self.layout = "insightface"
        self.num_classes = end - first_identity
        self.first_identity_key = first_identity
        self._flat_keys = None
        self._num_images = first_identity - 1

    @property
    def image_keys(self) -> np.ndarray:
        """Keys of the image records, in dataset order."""
        return np.arange(1, self._num_images + 1) if self._flat_keys is None else self._flat_keys

    def __len__(self) -> int:
        return self._num_images

    def key(self, index: int) -> int:
        """Record key of the ``index``-th image."""
        if not 0 <= index < self._num_images:
            raise IndexError(f"image {index} out of range for {self._num_images} images")
        return index + 1 if self._flat_keys is None else int(self._flat_keys[index])

    def require_images(self) -> None:
        """Raise, naming the file, when there is no image record to read (an empty or header-only dataset)."""
        if self._num_images:
            return
        rec_path, size = self.reader.rec_path, self.reader.file_size
        if not len(self.reader) and size:
            raise RecordIOError(
                f"{self.reader.idx_path}: empty dataset: the index lists none of the {size} bytes of {rec_path} "
                f"('convert_rec.py reindex {rec_path}' rebuilds it)"
            )
        raise RecordIOError(f"{rec_path}: empty dataset: no image records")

    def read(self, index: int) -> tuple[int, bytes]:
        """Label and encoded image bytes of the ``index``-th image.

        The label is the header's label, or the first of its labels when it carries several. It must
        be a whole number: a float32 label of 3.5 or NaN is damage, not class 3.
        """
        key = self.key(index)
        header, image = self._unpack(key)
        label = first_label(header)
        if not float(label).is_integer():
            raise RecordIOError(f"{self.reader.location(key)}: label {label} is not a whole number")
        return int(label), image

    def identity_range(self, label: int) -> tuple[int, int]:
        """``[start, end)`` image keys of class ``label`` (insightface layout only)."""
        if self.first_identity_key is None:
            raise RecordIOError(f"{self.reader.rec_path}: flat layout has no identity records")
        key = self.first_identity_key + label
        header = self._unpack(key)[0]
        if not isinstance(header.label, tuple) or len(header.label) < 2:
            raise RecordIOError(f"{self.reader.location(key)}: identity record needs 2 labels, has {header.flag}")
        return int(header.label[0]), int(header.label[1])

    def _unpack(self, key: int) -> tuple[IRHeader, bytes]:
        record = self.reader.read(key)
        try:
            return unpack(record)
        except RecordIOError as error:
            raise RecordIOError(f"{self.reader.location(key)}: {error}") from None
