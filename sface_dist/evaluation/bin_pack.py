"""insightface verification packs (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

A pack is a pickle of ``(images, issame)``: ``2N`` encoded images (JPEG/PNG
bytes, pair ``i`` is images ``2i`` and ``2i+1``) and ``N`` booleans. The packs
come from the internet, so they are unpickled by an unpickler that resolves
only the few numpy globals some packs need and refuses everything else
before it can run.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sface_dist.distributed import class_range

try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


class VerificationPackError(ValueError):
    """A verification pack that cannot be read: bad pickle, refused global, wrong structure, bad image."""


@dataclass(frozen=True)
class VerificationPack:
    """A decoded pack: ``images`` uint8 RGB ``[M, 3, H, W]``, ``issame`` bool ``[N]``, ``name`` the file stem.

    ``images`` are the pack's images ``first_image .. first_image + M - 1``: all ``2N`` of
    them (pair ``i`` is images ``2i`` and ``2i + 1``), or one rank's share (``read_bin``'s ``shard``).
    """

    images: torch.Tensor
    issame: np.ndarray
    name: str
    first_image: int = 0

    @property
    def is_complete(self) -> bool:
        return self.first_image == 0 and len(self.images) == 2 * len(self.issame)


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; only the latin1 codec is allowed."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# Packs written under numpy 1.x name ``numpy.core``, under numpy 2.x ``numpy._core``; both map to this numpy.
_SAFE_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{
        (f"numpy.{core}.{module}", name): getattr(namespace, name)
        for core in ("core", "_core")
        for module, namespace, name in (
            ("multiarray", _multiarray, "_reconstruct"),
            ("multiarray", _multiarray, "scalar"),
            ("numeric", _numeric, "_frombuffer"),
        )
    },
}


class _PackUnpickler(pickle.Unpickler):
    """Resolves only ``_SAFE_GLOBALS``: bytes, lists, tuples, bools and numpy bool arrays/scalars."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _unpickle(path: Path) -> object:
    with open(path, "rb") as f:
        try:
            # encoding="bytes": the original packs are Python 2 pickles whose images are py2 ``str``.
            return _PackUnpickler(f, encoding="bytes").load()
        except Exception as error:  # any failure of the sandboxed load means an unreadable pack
            raise VerificationPackError(f"{path}: not a readable verification pack: {error}") from None


def _issame_array(path: Path, issame: object) -> np.ndarray:
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise VerificationPackError(f"{path}: issame must be a 1-d bool array, got {issame.dtype} {issame.shape}")
        return issame.copy()
    if not isinstance(issame, (list, tuple)):
        raise VerificationPackError(f"{path}: issame must be a list of bools, got {type(issame).__name__}")
    for index, value in enumerate(issame):
        if not isinstance(value, (bool, np.bool_)):
            raise VerificationPackError(f"{path}: issame[{index}] is {type(value).__name__}, expected bool")
    return np.array(issame, dtype=np.bool_)


def _decode(path: Path, index: int, data: object, image_size: int) -> tuple[np.ndarray, bool]:
    """Decode image ``index`` to uint8 ``[3, S, S]`` RGB; the flag says whether it had to be resized."""
    if not isinstance(data, (bytes, bytearray)):
        raise VerificationPackError(f"{path}: image {index} is {type(data).__name__}, expected encoded bytes")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise VerificationPackError(f"{path}: image {index} cannot be decoded: {error}") from None
    resized = image.size != (image_size, image_size)
    if resized:
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.array(image).transpose(2, 0, 1), resized


def read_bin(
    path: str | os.PathLike[str], image_size: int = 112, shard: tuple[int, int] = (0, 1)
) -> VerificationPack:
    """Read and decode a pack; images not ``image_size`` square are resized, with one warning per pack.

    ``shard=(rank, world_size)`` decodes only that rank's contiguous share of the images
    (``distributed.class_range`` split), so ranks that share the evaluation hold ``1/world_size`` each.
    """
    path = Path(path)
    rank, world_size = shard
    if not 0 <= rank < world_size:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    content = _unpickle(path)
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise VerificationPackError(f"{path}: expected a pickled (images, issame) pair, got {type(content).__name__}")
    encoded, issame = content
    issame = _issame_array(path, issame)
    if not isinstance(encoded, (list, tuple)) or len(encoded) != 2 * len(issame):
        count = len(encoded) if isinstance(encoded, (list, tuple)) else type(encoded).__name__
        raise VerificationPackError(f"{path}: {len(issame)} pairs need {2 * len(issame)} images, got {count}")
    start, stop = class_range(len(encoded), rank, world_size)
    images = torch.empty((stop - start, 3, image_size, image_size), dtype=torch.uint8)
    resized_count = 0
    for index in range(start, stop):
        pixels, resized = _decode(path, index, encoded[index], image_size)
        images[index - start] = torch.from_numpy(pixels)
        resized_count += resized
    if resized_count:
        message = f"{path}: resized {resized_count} of {stop - start} images to {image_size}x{image_size}"
        warnings.warn(message, stacklevel=2)
    return VerificationPack(images=images, issame=issame, name=path.stem, first_image=start)


def write_bin(path: str | os.PathLike[str], jpeg_bytes: list[bytes], issame: list[bool]) -> None:
    """Write a pack in insightface's format, atomically (a temp file in the same folder, then rename)."""
    path = Path(path)
    if len(jpeg_bytes) != 2 * len(issame):
        raise ValueError(f"{path}: {len(issame)} pairs need {2 * len(issame)} images, got {len(jpeg_bytes)}")
    payload = ([bytes(data) for data in jpeg_bytes], [bool(value) for value in issame])
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as f:
            pickle.dump(payload, f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
