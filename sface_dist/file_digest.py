"""SHA-256 digests of the files the project writes, and their check when a file is read back.

A writer records ``{"sha256": hex, "bytes": size}`` for each file it writes (computed on the bytes as they
are written, so the file is not read twice); a reader compares the file on disk with that record before it
trusts the file. A flipped byte, a truncated copy or a file swapped for another one is refused in one line
naming the file. SHA-256 runs at about 1.7 GiB/s on one core with the CPU's SHA extensions
(``tools/bench_checkpoint_digest.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

ALGORITHM = "sha256"
CHUNK_BYTES = 8 << 20


class DigestMismatch(ValueError):
    """A file whose bytes are not those its writer recorded."""


class DigestWriter:
    """A binary file that hashes what is written through it (what ``torch.save`` needs: ``write`` and ``flush``)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.hash = hashlib.new(ALGORITHM)
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def record(self) -> dict[str, Any]:
        """The digest of everything written so far, in the form ``verify_file`` takes."""
        return {ALGORITHM: self.hash.hexdigest(), "bytes": self.size}


def file_record(path: str | Path) -> dict[str, Any]:
    """The digest record of the file at ``path``, read in chunks."""
    digest = hashlib.new(ALGORITHM)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return {ALGORITHM: digest.hexdigest(), "bytes": size}


def is_record(value: Any) -> bool:
    """Whether ``value`` is a digest record (a hex digest of the right length and a byte count)."""
    return (
        isinstance(value, dict)
        and isinstance(value.get(ALGORITHM), str)
        and len(value[ALGORITHM]) == hashlib.new(ALGORITHM).digest_size * 2
        and isinstance(value.get("bytes"), int)
    )


def verify_file(path: str | Path, recorded: dict[str, Any]) -> None:
    """Raise ``DigestMismatch`` naming ``path`` unless its size and SHA-256 are those ``recorded``."""
    path = Path(path)
    size = path.stat().st_size
    if size != recorded["bytes"]:
        raise DigestMismatch(
            f"{path}: damaged or changed since it was written: {size} bytes, {recorded['bytes']} recorded"
        )
    found = file_record(path)[ALGORITHM]
    if found != recorded[ALGORITHM]:
        raise DigestMismatch(
            f"{path}: damaged or changed since it was written: {ALGORITHM} {found[:16]}…, "
            f"{recorded[ALGORITHM][:16]}… recorded"
        )


def sidecar(path: str | Path) -> Path:
    """Where the digest of a standalone file (an exported ONNX model) is kept: ``NAME.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sidecar_line(path: str | Path, record: dict[str, Any]) -> str:
    """The sidecar's text: one ``sha256sum`` line, so ``sha256sum -c NAME.sha256`` checks the file too."""
    return f"{record[ALGORITHM]}  {Path(path).name}\n"


def verify_against_sidecar(path: str | Path) -> bool:
    """Check ``path`` against its sidecar; False when it has none (the file is unverified), ``DigestMismatch``
    naming the file when it differs."""
    path = Path(path)
    try:
        text = sidecar(path).read_text(errors="replace")
    except FileNotFoundError:
        return False
    expected = text.split()[0] if text.split() else ""
    if len(expected) != hashlib.new(ALGORITHM).digest_size * 2:
        raise DigestMismatch(f"{sidecar(path)}: not a {ALGORITHM}sum line for {path.name}")
    found = file_record(path)[ALGORITHM]
    if found != expected.lower():
        raise DigestMismatch(
            f"{path}: damaged or changed since it was written: {ALGORITHM} {found[:16]}…, {expected[:16]}… in "
            f"{sidecar(path).name}"
        )
    return True
