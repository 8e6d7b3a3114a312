"""insightface verification packs (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

A pack is a pickle of ``(images, issame)``: ``2N`` encoded images (JPEG/PNG
bytes, pair ``i`` is images ``2i`` and ``2i+1``) and ``N`` booleans. The packs
come from the internet, so they are untrusted input. They are unpickled by an
unpickler that resolves only the few numpy globals some packs need, refuses
everything else before it can run, and builds nothing that the file does not
pay for byte by byte; before the decoded images are allocated, the entries
must each have their own storage and this rank's share must fit in the memory
available.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from PIL import Image

from sface_dist.atomic_write import atomic_open
from sface_dist.memory import available_host_memory
from sface_dist.parallel.partition import even_split

try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


class VerificationPackError(ValueError):
    """A pack that cannot or may not be read: bad pickle, refused global or bomb, wrong structure, bad image."""


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


def _latin1_encode(text: object, encoding: object) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; only the latin1 codec is allowed."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _DtypeSpec:
    """What a pickled ``numpy.dtype`` becomes: a name and a byte order, resolved only to a numeric dtype.

    numpy's own ``dtype.__setstate__`` accepts states (object flags, fields) on which numpy's
    array code crashes the interpreter, so no real dtype ever receives a pack's state.
    """

    __slots__ = ("name", "byteorder")

    def __init__(self, name: object, *_align_copy: object) -> None:
        self.name = name
        self.byteorder = "="

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 5 or state[2:5] != (None, None, None):
            raise pickle.UnpicklingError(f"refused numpy dtype state {state!r:.80}")
        byteorder = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]  # bytes: Python 2 packs
        if byteorder not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"refused numpy dtype byte order {byteorder!r:.20}")
        self.byteorder = byteorder


def _resolve(spec: object) -> np.dtype:
    """The bool or numeric dtype ``spec`` names; object, string, void and structured dtypes are refused."""
    if not isinstance(spec, _DtypeSpec):
        raise pickle.UnpicklingError(f"expected a numpy dtype, got {type(spec).__name__}")
    dtype = np.dtype(spec.name)
    if dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"refused numpy dtype {dtype}")
    return dtype if spec.byteorder in ("|", "=") else dtype.newbyteorder(spec.byteorder)


class _PackArray(np.ndarray):
    """The arrays a pack builds; BUILD may give one only a numeric dtype and the bytes that fill it."""

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[4], bytes):
            raise pickle.UnpicklingError("refused numpy array state")
        version, shape, spec, fortran_order, data = state
        super().__setstate__((version, shape, _resolve(spec), fortran_order, data))


def _ndarray(*_args: object) -> NoReturn:
    """What ``numpy.ndarray`` resolves to: a marker for ``_reconstruct``, refusing to be called."""
    raise pickle.UnpicklingError("refused numpy.ndarray(...): it allocates whatever shape the pickle declares")


def _reconstruct(subtype: object, shape: object, typecode: object) -> _PackArray:
    """numpy's ``_reconstruct`` as numpy pickles call it: an empty array that BUILD then fills."""
    if subtype is not _ndarray or shape != (0,):
        raise pickle.UnpicklingError(f"refused numpy _reconstruct of shape {shape!r:.40}")
    return np.empty(0, dtype=np.uint8).view(_PackArray)


def _frombuffer(buffer: object, spec: object, shape: object, order: object) -> _PackArray:
    """numpy's protocol-5 ``_frombuffer``: a view of bytes already in the pickle."""
    return _numeric._frombuffer(buffer, _resolve(spec), shape, order).view(_PackArray)


def _scalar(spec: object, data: object = None) -> np.generic:
    """numpy's ``scalar``, only from pickled bytes: without them numpy allocates and zeroes the dtype's size."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refused numpy scalar from {type(data).__name__}")
    return _multiarray.scalar(_resolve(spec), data)


# Packs written under numpy 1.x name ``numpy.core``, under numpy 2.x ``numpy._core``.
_SAFE_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _DtypeSpec,
    **{
        (f"numpy.{core}.{module}", name): function
        for core in ("core", "_core")
        for module, name, function in (
            ("multiarray", "_reconstruct", _reconstruct),
            ("multiarray", "scalar", _scalar),
            ("numeric", "_frombuffer", _frombuffer),
        )
    },
}

_Load = Callable[["_PackUnpickler"], None]


def _no_second_reference_to_bytes(load: _Load) -> _Load:
    """An opcode that pushes an object already loaded (memo GET, DUP), refusing it for bytes.

    Such references cost the file 1-5 bytes each, so entries sharing one stored image
    could declare millions of images (and terabytes of pixels) in a few megabytes.
    """

    def load_reference(unpickler: _PackUnpickler) -> None:
        load(unpickler)
        if isinstance(unpickler.stack[-1], (bytes, bytearray)):
            raise pickle.UnpicklingError(
                f"{len(unpickler.stack[-1])} stored bytes are referenced again (a pickle memo reference):"
                " image entries may not share storage, a real pack stores every image separately"
            )

    return load_reference


MAX_PACK_CONTAINERS = 1000
"""Lists, tuples and dicts a pack may build: a real one builds a handful (the pair, the images, issame, numpy's
arguments), while a file of empty lists builds one per 2 bytes at ~80 times their size."""
MAX_PACK_IMAGE_PIXELS = 4096 * 4096
"""Pixels of one image of a pack (a face crop is 112 x 112): a larger one is refused from its header, before its
decoding asks for hundreds of megabytes."""
_CONTAINER_OPCODES = (pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.LIST, pickle.DICT,
                      pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)


def _counted_container(load: _Load) -> _Load:
    """An opcode that builds a list, tuple or dict, counted against ``MAX_PACK_CONTAINERS``."""

    def load_container(unpickler: _PackUnpickler) -> None:
        unpickler.containers += 1
        if unpickler.containers > MAX_PACK_CONTAINERS:
            raise pickle.UnpicklingError(
                f"more than {MAX_PACK_CONTAINERS} lists, tuples or dicts: a pack holds two lists (the images and "
                "issame)"
            )
        load(unpickler)

    return load_container


class _PackUnpickler(pickle._Unpickler):
    """Resolves only ``_SAFE_GLOBALS`` and builds nothing that the file does not pay for.

    The pure-Python unpickler, because its memo is a dict: the C one resizes its memo to
    twice any index a PUT names, so a 9-byte pickle makes it zero 32 GB. On top of that,
    stored bytes may not be referenced twice, ``_codecs.encode`` may not return more bytes
    than the file holds nor a BYTEARRAY8 declare more, BUILD runs only on the numpy
    stand-ins, sets are refused and at most ``MAX_PACK_CONTAINERS`` lists, tuples and dicts are
    built. What remains is pickle's linear cost, ~2x the file for a real pack. Real packs are a few opcodes
    per image, so the Python loop costs little: 0.1-0.6 s for a 60 MB pack of 12,000
    images, which takes ~6 s to decode.
    """

    dispatch: dict[int, _Load] = {
        **pickle._Unpickler.dispatch,
        **{
            opcode[0]: _no_second_reference_to_bytes(pickle._Unpickler.dispatch[opcode[0]])
            for opcode in (pickle.GET, pickle.BINGET, pickle.LONG_BINGET, pickle.DUP)
        },
        **{opcode[0]: _counted_container(pickle._Unpickler.dispatch[opcode[0]]) for opcode in _CONTAINER_OPCODES},
    }

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")  # "bytes": py2 packs' images are py2 ``str``
        self._file_size = len(data)
        self._encoded_bytes = 0
        self.containers = 0
        self._globals = {**_SAFE_GLOBALS, ("_codecs", "encode"): self._encode}

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def _encode(self, text: object, encoding: object) -> bytes:
        data = _latin1_encode(text, encoding)
        self._encoded_bytes += len(data)
        if self._encoded_bytes > self._file_size:
            raise pickle.UnpicklingError(
                f"_codecs.encode calls build more bytes than the {self._file_size}-byte file holds"
            )
        return data

    def load_bytearray8(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self._file_size:
            raise pickle.UnpicklingError(f"a {size}-byte bytearray declared in a {self._file_size}-byte file")
        self.append(bytearray(self.read(size)))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_build(self) -> None:
        target = self.stack[-2]  # stack[-1] is the state
        if not isinstance(target, (_DtypeSpec, _PackArray)):
            raise pickle.UnpicklingError(f"refused BUILD of {type(target).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def load_set(self) -> NoReturn:
        raise pickle.UnpicklingError("refused a set: packs hold none, and one byte of file makes a 200-byte set")

    dispatch[pickle.EMPTY_SET[0]] = dispatch[pickle.FROZENSET[0]] = load_set


def _unpickle(path: Path) -> object:
    if path.is_dir():
        packs = sorted(child.name for child in path.glob("*.bin"))[:3]
        inside = f" (it holds {', '.join(packs)})" if packs else ""
        raise VerificationPackError(f"{path}: a folder, not a verification pack: name the .bin file{inside}")
    if not path.is_file():
        raise VerificationPackError(f"{path}: no such verification pack")
    data = path.read_bytes()
    try:
        return _PackUnpickler(data).load()
    except Exception as error:  # any failure of the sandboxed load means an unreadable pack
        reason = str(error) or ("the file ends before its pickle does" if isinstance(error, EOFError)
                                else type(error).__name__)
        raise VerificationPackError(f"{path}: not a readable verification pack: {reason}") from None


def _issame_array(path: Path, issame: object) -> np.ndarray:
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise VerificationPackError(f"{path}: issame must be a 1-d bool array, got {issame.dtype} {issame.shape}")
        return np.array(issame)  # a plain ndarray copy of the unpickled ``_PackArray``
    if not isinstance(issame, (list, tuple)):
        raise VerificationPackError(f"{path}: issame must be a list of bools, got {type(issame).__name__}")
    for index, value in enumerate(issame):
        if not isinstance(value, (bool, np.bool_)):
            raise VerificationPackError(f"{path}: issame[{index}] is {type(value).__name__}, expected bool")
    return np.array(issame, dtype=np.bool_)


def _check_separate_storage(path: Path, encoded: Sequence[object]) -> None:
    """Refuse entries that are one stored object: every declared image must be paid for in the file.

    The unpickler already refuses memo references to bytes; this also catches the empty and
    one-byte bytes objects, which CPython shares, so many entries can be one without any reference.
    """
    repeats = len(encoded) - len({id(entry) for entry in encoded})
    if repeats:
        raise VerificationPackError(
            f"{path}: {repeats} of the {len(encoded)} image entries share storage with another entry;"
            " a real pack stores every image separately"
        )


def _check_memory(path: Path, count: int, image_size: int) -> None:
    """Refuse a share whose decoded images (``count x 3 x S x S`` bytes) exceed the memory available."""
    needed = count * 3 * image_size * image_size
    available = available_host_memory()
    if available is not None and needed > available:
        raise VerificationPackError(
            f"{path}: {count} images decoded at {image_size}x{image_size} need {needed / 2**30:.2f} GiB,"
            f" more than the {available / 2**30:.2f} GiB of memory available"
        )


def _decode(path: Path, index: int, data: object, image_size: int) -> tuple[np.ndarray, bool]:
    """Decode image ``index`` to uint8 ``[3, S, S]`` RGB; the flag says whether it had to be resized. An image
    larger than ``MAX_PACK_IMAGE_PIXELS`` is refused from its header, before it is decoded."""
    if not isinstance(data, (bytes, bytearray)):
        raise VerificationPackError(f"{path}: image {index} is {type(data).__name__}, expected encoded bytes")
    too_large = None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_PACK_IMAGE_PIXELS:
                too_large = f"{width}x{height}"
            else:
                image = opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise VerificationPackError(f"{path}: image {index} cannot be decoded: {error}") from None
    if too_large is not None:
        raise VerificationPackError(
            f"{path}: image {index} is {too_large}: more than the {MAX_PACK_IMAGE_PIXELS} pixels a face crop of a "
            "pack may have"
        )
    resized = image.size != (image_size, image_size)
    if resized:
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.array(image).transpose(2, 0, 1), resized


def read_bin(
    path: str | os.PathLike[str], image_size: int = 112, shard: tuple[int, int] = (0, 1)
) -> VerificationPack:
    """Read and decode a pack; images not ``image_size`` square are resized, with one warning per pack.

    ``shard=(rank, world_size)`` decodes only that rank's contiguous share of the images
    (``parallel.partition.even_split``), so ranks that share the evaluation hold ``1/world_size`` each.
    Before the output is allocated, entries that share storage and a share whose decoded size exceeds
    the memory available are refused; images are then decoded one at a time into the output, so
    memory peaks at the output plus one image.
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
    _check_separate_storage(path, encoded)
    start, stop = even_split(len(encoded), rank, world_size)
    _check_memory(path, stop - start, image_size)
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
    """Write a pack in insightface's format, atomically (a temp file in the same folder, then rename).

    Every entry is stored separately, like insightface's packs, even where one bytes object is
    passed twice: pickle would write the repeat as a memo reference, which ``read_bin`` refuses.
    """
    path = Path(path)
    if len(jpeg_bytes) != 2 * len(issame):
        raise ValueError(f"{path}: {len(issame)} pairs need {2 * len(issame)} images, got {len(jpeg_bytes)}")
    payload = (_separately_stored(jpeg_bytes), [bool(value) for value in issame])
    with atomic_open(path) as f:
        pickle.dump(payload, f, protocol=4)


def _separately_stored(images: Sequence[bytes]) -> list[bytes]:
    """The images as bytes objects, copying any object that appears again so each entry has its own."""
    stored: list[bytes] = []
    seen: set[int] = set()
    for data in images:
        entry = bytes(data)
        if id(entry) in seen:
            entry = bytes(memoryview(entry))
        seen.add(id(entry))
        stored.append(entry)
    return stored
