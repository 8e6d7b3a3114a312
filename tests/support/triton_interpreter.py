"""Run a test module's ``__main__`` under the Triton interpreter (``TRITON_INTERPRET=1``) in a child process.

The variable must be set before Triton is imported, so the interpreted cases run in a fresh interpreter that
prints its results as JSON on its last line; the test module's fixtures read them back once per module. The
child finds this folder's helpers on ``PYTHONPATH``, as pytest finds them on its ``pythonpath``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sface_dist.heads.kernels.fused import triton_available


def interpreted_results(module_file: str, timeout_s: float) -> Any:
    """The JSON ``module_file`` prints last when run as a script under the interpreter (skips without Triton)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    pythonpath = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": pythonpath}
    result = subprocess.run(
        [sys.executable, module_file], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
