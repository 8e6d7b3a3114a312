"""Fixtures shared by the test modules: the demo dataset, a finished run on it, and tmpfs mounts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from training_runs import ROOT, train_in_process, write_config


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tools/make_demo_data.py``'s dataset at its smallest: 24 identities x 8 images, 40 held-out pairs."""
    out = tmp_path_factory.mktemp("data") / "demo"
    command = [sys.executable, "tools/make_demo_data.py", "--out", str(out), "--identities", "24", "--images", "8",
               "--heldout", "8", "--pairs", "40"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def trained_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 and a best backbone for ``heldout``."""
    run = tmp_path_factory.mktemp("trained") / "run"
    config = write_config(run.parent / "run.yaml", demo_data, run)
    assert train_in_process(config) == 0
    assert (run / "best" / "heldout" / "backbone.pt").is_file()
    return run


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount small tmpfs file systems (root only): a real full or read-only disk."""
    mounts: list[Path] = []

    def mount(size: str, options: str = "rw") -> Path:
        point = tmp_path / f"mount{len(mounts)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},{options}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "--lazy", str(point)], check=False)
