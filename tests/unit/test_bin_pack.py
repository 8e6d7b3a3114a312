"""Verification packs (.bin): reading, writing, the unpickling whitelist, clear errors, shards."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sface_dist.data.bin_pack import VerificationPackError, read_bin, write_bin

from pack_fixtures import encode_image


def decoded(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def python2_pack(images: list[bytes], issame: list[bool]) -> bytes:
    """A pack as Python 2 pickled it (protocol 2; images are py2 ``str``, i.e. BINSTRING opcodes)."""
    strings = b"".join(b"T" + struct.pack("<I", len(data)) + data for data in images)
    bools = b"".join(b"\x88" if value else b"\x89" for value in issame)
    return b"\x80\x02](" + strings + b"e](" + bools + b"e\x86."


def test_write_read_round_trip(tmp_path: Path) -> None:
    images = [encode_image(seed) for seed in range(6)]
    issame = [True, False, True]
    path = tmp_path / "lfw.bin"
    write_bin(path, images, issame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lfw.bin"]  # no temp file left behind

    pack = read_bin(path)
    assert pack.name == "lfw"
    assert pack.images.dtype == torch.uint8 and pack.images.shape == (6, 3, 112, 112)
    assert pack.issame.dtype == np.bool_ and pack.issame.tolist() == issame
    for index, data in enumerate(images):
        assert torch.equal(pack.images[index], decoded(data))

    with open(path, "rb") as f:
        assert pickle.load(f) == (images, issame)  # insightface's layout, readable by plain pickle


def test_png_and_grayscale_images_decode_to_rgb(tmp_path: Path) -> None:
    gray = io.BytesIO()
    Image.new("L", (112, 112), color=77).save(gray, format="PNG")
    path = tmp_path / "mixed.bin"
    write_bin(path, [encode_image(1, fmt="PNG"), gray.getvalue()], [False])
    pack = read_bin(path)
    assert torch.equal(pack.images[0], decoded(encode_image(1, fmt="PNG")))
    assert (pack.images[1] == 77).all()


def test_reads_python2_packs(tmp_path: Path) -> None:
    images = [encode_image(seed) for seed in range(4)]
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(python2_pack(images, [False, True]))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())  # why the default str decoding cannot be used
    pack = read_bin(path)
    assert pack.issame.tolist() == [False, True]
    assert torch.equal(pack.images[3], decoded(images[3]))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("as_array", [True, False])
def test_reads_numpy_issame(tmp_path: Path, protocol: int, as_array: bool) -> None:
    flags = np.array([True, False, False])
    issame = flags if as_array else list(flags)  # an array, or a list of numpy bool scalars
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps(([encode_image(seed) for seed in range(6)], issame), protocol=protocol))
    assert read_bin(path).issame.tolist() == [True, False, False]


class _RunsShellCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(([_RunsShellCommand(f"touch {sentinel}")], [True]), protocol=4)
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)

    with pytest.raises(VerificationPackError, match=rf"{path}: .*refused global (posix|nt|os)\.system"):
        read_bin(path)
    assert not sentinel.exists()

    pickle.loads(payload)  # control: a plain unpickler does run it
    assert sentinel.exists()


@pytest.mark.parametrize(
    ("module", "name"), [("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load"), ("torch", "load")]
)
def test_only_whitelisted_globals_resolve(tmp_path: Path, module: str, name: str) -> None:
    path = tmp_path / "global.bin"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b".")
    with pytest.raises(VerificationPackError, match=rf"refused global {module}\.{name}"):
        read_bin(path)


def test_codecs_encode_is_limited_to_latin1(tmp_path: Path) -> None:
    path = tmp_path / "codec.bin"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(VerificationPackError, match=r"refused _codecs.encode with encoding 'rot13'"):
        read_bin(path)


def _write_pickle(path: Path, content: object) -> Path:
    path.write_bytes(pickle.dumps(content, protocol=4))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"images": []}, r"expected a pickled \(images, issame\) pair, got dict"),
        (([b""], [True], [1]), r"expected a pickled \(images, issame\) pair, got tuple"),
        (([encode_image(seed) for seed in range(3)], [True]), r"1 pairs need 2 images, got 3"),
        ((b"not a list", [True]), r"1 pairs need 2 images, got bytes"),
        (([encode_image(0), encode_image(1)], [1]), r"issame\[0\] is int, expected bool"),
        (([encode_image(0), encode_image(1)], "yes"), r"issame must be a list of bools, got str"),
        (([encode_image(0), encode_image(1)], np.array([1])), r"issame must be a 1-d bool array, got int64"),
        (
            ([encode_image(0), encode_image(1), "text", encode_image(3)], [True, False]),
            r"image 2 is str, expected encoded bytes",
        ),
        (([encode_image(0), b"\xff\xd8 not a jpeg"], [True]), r"image 1 cannot be decoded"),
    ],
)
def test_bad_structure_names_file_and_index(tmp_path: Path, content: object, message: str) -> None:
    path = _write_pickle(tmp_path / "bad.bin", content)
    with pytest.raises(VerificationPackError, match=rf"^{path}: {message}"):
        read_bin(path)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    write_bin(path, [encode_image(0), encode_image(1)], [True])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(VerificationPackError, match=rf"^{path}: not a readable verification pack"):
        read_bin(path)


def test_a_pack_gets_the_permissions_of_every_other_output(tmp_path: Path) -> None:
    """``open`` under the process's umask is the reference (a temporary made by mkstemp would be 0600)."""
    write_bin(tmp_path / "pack.bin", [encode_image(0)] * 2, [True])
    (tmp_path / "other").write_bytes(b"")
    mode = (tmp_path / "other").stat().st_mode & 0o777
    assert mode != 0o600 and (tmp_path / "pack.bin").stat().st_mode & 0o777 == mode


def test_write_bin_checks_pair_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 pairs need 4 images, got 3"):
        write_bin(tmp_path / "x.bin", [b"a", b"b", b"c"], [True, False])
    assert list(tmp_path.iterdir()) == []


def test_images_of_other_sizes_are_resized_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    write_bin(path, [encode_image(0, size=(128, 96)), encode_image(1)], [False])
    with pytest.warns(UserWarning, match=r"resized 1 of 2 images to 112x112"):
        pack = read_bin(path)
    assert pack.images.shape == (2, 3, 112, 112)
    with pytest.warns(UserWarning, match=r"resized 2 of 2 images to 128x128"):
        assert read_bin(path, image_size=128).images.shape == (2, 3, 128, 128)


def test_no_warning_when_sizes_match(tmp_path: Path) -> None:
    path = tmp_path / "ok.bin"
    write_bin(path, [encode_image(0), encode_image(1)], [True])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_bin(path)


def test_shards_of_a_pack_concatenate_to_the_whole(tmp_path: Path) -> None:
    path = tmp_path / "lfw.bin"
    write_bin(path, [encode_image(seed) for seed in range(10)], [True, False, True, False, True])
    whole = read_bin(path)
    shards = [read_bin(path, shard=(rank, 3)) for rank in range(3)]
    assert [len(s.images) for s in shards] == [4, 3, 3] and [s.first_image for s in shards] == [0, 4, 7]
    assert torch.equal(torch.cat([s.images for s in shards]), whole.images)
    assert whole.is_complete and not shards[1].is_complete
