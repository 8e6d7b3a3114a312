"""Verification packs are untrusted: crafted pickles must be refused before they can exhaust memory."""

from __future__ import annotations

import io
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sface_dist import memory
from sface_dist.data import bin_pack
from sface_dist.data.bin_pack import VerificationPackError, read_bin, write_bin

try:
    from numpy._core import multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray

MiB = 2**20


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=40)
    return buffer.getvalue()


class Reduce:
    """Pickles as ``function(*args)`` (then BUILD ``state`` when given): how crafted packs call the whitelist."""

    def __init__(self, function: object, args: tuple[object, ...], state: object = None) -> None:
        self.function, self.args, self.state = function, args, state

    def __reduce__(self) -> tuple[object, ...]:
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


@pytest.fixture
def no_huge_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty fails for anything over 1 GiB: a refused pack must never reach its allocation."""
    empty = torch.empty

    def guarded(size: tuple[int, ...], *args: object, **kwargs: object) -> torch.Tensor:
        assert np.prod(size) <= 2**30, f"read_bin allocated {np.prod(size) / 2**30:.0f} GiB"
        return empty(size, *args, **kwargs)

    monkeypatch.setattr(torch, "empty", guarded)


def peak_traced_bytes(path: Path) -> tuple[int, str]:
    """Peak Python/numpy heap while ``read_bin`` refuses ``path``, and its message."""
    tracemalloc.start()
    try:
        with pytest.raises(VerificationPackError) as refused:
            read_bin(path)
        return tracemalloc.get_traced_memory()[1], str(refused.value)
    finally:
        tracemalloc.stop()


def test_ten_million_pairs_of_one_stored_jpeg_are_refused_while_loading(tmp_path: Path, no_huge_tensor: None) -> None:
    image = jpeg(0)
    path = tmp_path / "bomb.bin"
    path.write_bytes(pickle.dumps(([image] * 20_000_000, [True] * 10_000_000), protocol=4))
    assert path.stat().st_size < 50 * MiB  # declares 20M images = 752 GB decoded
    with pytest.raises(VerificationPackError) as refused:
        read_bin(path)
    assert str(refused.value) == (
        f"{path}: not a readable verification pack: {len(image)} stored bytes are referenced again"
        " (a pickle memo reference): image entries may not share storage, a real pack stores every image separately"
    )


def test_entries_that_are_one_shared_object_are_counted_and_refused(tmp_path: Path, no_huge_tensor: None) -> None:
    """One-byte bytes are one object in CPython, so 2M separate SHORT_BINBYTES entries share storage."""
    path = tmp_path / "singletons.bin"
    pairs = 1_000_000
    path.write_bytes(b"\x80\x04](" + b"C\x01x" * (2 * pairs) + b"e](" + b"\x88" * pairs + b"e\x86.")
    assert path.stat().st_size < 8 * MiB  # declares 75 GB decoded
    with pytest.raises(VerificationPackError, match=rf"^{path}: 1999999 of the 2000000 image entries share storage"):
        read_bin(path)


def test_memo_index_cannot_preallocate(tmp_path: Path) -> None:
    """C's unpickler resizes its memo to twice a PUT's index: these 9 bytes cost it 256 MiB (32 GiB at 2**31)."""
    path = tmp_path / "memo.bin"
    path.write_bytes(b"\x80\x02N" + b"r" + struct.pack("<I", 2**24) + b".")
    peak, message = peak_traced_bytes(path)
    assert message == f"{path}: expected a pickled (images, issame) pair, got NoneType"
    assert peak < 4 * MiB


def test_codecs_encode_cannot_build_more_than_the_file_holds(tmp_path: Path) -> None:
    """Protocol-2 bytes are ``_codecs.encode(str)`` calls; 64 calls on one memoized 1 MiB str would build 64 MiB."""
    text = ("x" * MiB).encode()
    call = b"h\x00h\x01R"  # encode(*args), both from the memo
    path = tmp_path / "encode.bin"
    path.write_bytes(
        b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(text)) + text + b"X\x06\x00\x00\x00latin1\x86q\x01"
        b"](" + call * 64 + b"e](" + b"\x88" * 32 + b"e\x86."
    )
    peak, message = peak_traced_bytes(path)
    assert message.startswith(f"{path}: not a readable verification pack: _codecs.encode calls build more bytes")
    assert peak < 8 * MiB


@pytest.mark.parametrize(
    ("crafted", "refusal"),
    [
        (Reduce(np.ndarray, ((2**26,), "O")), r"refused numpy\.ndarray\(\.\.\.\)"),  # 512 MiB of None pointers
        (Reduce(multiarray._reconstruct, (np.ndarray, (2**28,), b"b")), r"refused numpy _reconstruct of shape"),
        (Reduce(multiarray.scalar, (np.dtype(f"V{2**28}"),)), r"refused numpy scalar from NoneType"),  # zeroes 256 MiB
        (Reduce(multiarray.scalar, (np.dtype("O"), bytes(8))), r"refused numpy dtype object"),
    ],
)
def test_numpy_globals_allocate_nothing_declared(tmp_path: Path, crafted: Reduce, refusal: str) -> None:
    path = tmp_path / "numpy.bin"
    path.write_bytes(pickle.dumps(([jpeg(0), jpeg(1)], crafted), protocol=2))
    peak, message = peak_traced_bytes(path)
    assert message.startswith(f"{path}: not a readable verification pack: ")
    assert re.search(refusal, message)
    assert peak < 8 * MiB


def test_object_dtype_smuggled_through_dtype_state_is_refused(tmp_path: Path) -> None:
    """numpy 2.4 segfaults here: a bool dtype given object flags by BUILD, then an array state with a short list.

    Run in a child process, so that a regression fails this test instead of killing the session.
    """
    dtype = Reduce(np.dtype, ("b1", False, True), state=(3, "|", None, None, None, -1, -1, 0x3F))
    array = Reduce(multiarray._reconstruct, (np.ndarray, (0,), b"b"), state=(1, (10,), dtype, False, [1, 2]))
    path = tmp_path / "segfault.bin"
    path.write_bytes(pickle.dumps(([jpeg(0), jpeg(1)], array), protocol=2))
    child = subprocess.run(
        [sys.executable, "-c", f"from sface_dist.data.bin_pack import read_bin; read_bin({str(path)!r})"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 1, child.stderr
    assert "VerificationPackError" in child.stderr and "refused numpy array state" in child.stderr


def test_declared_bytearray_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bytearray.bin"
    path.write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b".")
    with pytest.raises(VerificationPackError, match=r"a 1099511627776-byte bytearray declared in a 12-byte file"):
        read_bin(path)


def test_sets_are_refused(tmp_path: Path) -> None:
    """Packs hold no sets; each empty one costs ~200 bytes of memory for one byte of file."""
    path = tmp_path / "sets.bin"
    path.write_bytes(b"\x80\x04](" + b"\x8f" * 1000 + b"e.")
    with pytest.raises(VerificationPackError, match=r"not a readable verification pack: refused a set"):
        read_bin(path)


def test_build_only_reaches_numpy_stand_ins(tmp_path: Path) -> None:
    """BUILD on a whitelisted function would set its attributes (``__defaults__``) for every later pack."""
    path = tmp_path / "build.bin"
    path.write_bytes(b"\x80\x02c_codecs\nencode\n(}(X\x0c\x00\x00\x00__defaults__)dtb.")
    with pytest.raises(VerificationPackError, match=r"refused BUILD of method"):
        read_bin(path)


def test_share_larger_than_available_memory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lfw.bin"
    write_bin(path, [jpeg(seed) for seed in range(6)], [True, False, True])
    monkeypatch.setattr(bin_pack, "available_host_memory", lambda: 8 * MiB)
    with pytest.raises(VerificationPackError) as refused:
        read_bin(path, image_size=1024)  # 6 x 3 MiB
    assert str(refused.value) == (
        f"{path}: 6 images decoded at 1024x1024 need 0.02 GiB, more than the 0.01 GiB of memory available"
    )
    with pytest.warns(UserWarning, match="resized 2 of 2"):
        assert read_bin(path, image_size=1024, shard=(0, 3)).images.shape == (2, 3, 1024, 1024)  # 6 MiB fits
    monkeypatch.setattr(bin_pack, "available_host_memory", lambda: None)  # unknown: not checked
    assert read_bin(path).images.shape == (6, 3, 112, 112)


def test_available_memory_falls_back_to_sysconf_then_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    assert memory.available_host_memory() > 0  # Linux: MemAvailable

    def no_proc_meminfo(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("/proc/meminfo")

    def unknown_name(name: str) -> int:  # as macOS answers SC_AVPHYS_PAGES
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(memory, "open", no_proc_meminfo, raising=False)
    monkeypatch.setattr(memory.os, "sysconf", {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}.__getitem__)
    assert memory.available_host_memory() == 4_096_000
    monkeypatch.setattr(memory.os, "sysconf", unknown_name)
    assert memory.available_host_memory() is None


def test_write_bin_stores_a_repeated_image_object_separately(tmp_path: Path) -> None:
    first, second = jpeg(0), jpeg(1)
    path = tmp_path / "repeats.bin"
    write_bin(path, [first, second, first, first], [True, False])
    images = pickle.loads(path.read_bytes())[0]
    assert images == [first, second, first, first]
    assert len({id(image) for image in images}) == 4  # no memo references in the file
    pack = read_bin(path)
    assert torch.equal(pack.images[0], pack.images[2]) and torch.equal(pack.images[0], pack.images[3])


@pytest.mark.parametrize("core", ["numpy._core", "numpy.core"])
@pytest.mark.parametrize("issame", [np.array([True, False]), [np.True_, np.False_]], ids=["array", "scalars"])
def test_numpy_issame_of_numpy_1_and_2_still_reads(tmp_path: Path, core: str, issame: object) -> None:
    data = pickle.dumps(([jpeg(seed) for seed in range(4)], issame), protocol=2)  # text GLOBALs can be renamed
    path = tmp_path / "numpy.bin"
    path.write_bytes(data.replace(b"numpy._core.", f"{core}.".encode()))
    pack = read_bin(path)
    assert pack.issame.tolist() == [True, False] and type(pack.issame) is np.ndarray
