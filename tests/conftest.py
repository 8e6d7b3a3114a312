"""Fixtures of both suites (tests/unit, tests/faults): the demo dataset and a finished run on it."""

from __future__ import annotations

import subprocess
import sys
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
