"""The exit-status convention every entry point shares (``sface_dist.cli``), against the statuses it documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sface_dist.cli import FAILED, INTERRUPTED, run_cli
from sface_dist.parallel.agreement import PeerError

ROOT = Path(__file__).resolve().parents[2]


def raising(error: BaseException):  # noqa: ANN201
    def main() -> int:
        raise error

    return main


def test_user_errors_are_one_line_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    for error in (ValueError("config.yaml: train.steps: expected an integer\nmore"), FloatingPointError("nan"),
                  FileNotFoundError(2, "No such file or directory", "data/x.rec")):
        assert run_cli(raising(error)) == FAILED == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: config.yaml: train.steps: expected an integer", "error: nan",
        "error: data/x.rec: no such file or directory"]


def test_a_peers_error_is_its_own_line_not_this_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(raising(PeerError("another rank stopped with an error"))) == 1
    assert capsys.readouterr().err == ""


def test_ctrl_c_is_130_and_a_tools_own_errors_join_in(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(raising(KeyboardInterrupt())) == INTERRUPTED == 130
    assert run_cli(raising(KeyboardInterrupt()), interrupted="interrupted: again to continue") == 130
    assert run_cli(raising(subprocess.CalledProcessError(1, "torchrun")), also=(subprocess.CalledProcessError,)) == 1
    assert capsys.readouterr().err.splitlines()[:2] == ["interrupted", "interrupted: again to continue"]
    with pytest.raises(RuntimeError):  # a bug is not a user error: its traceback stays
        run_cli(raising(RuntimeError("bug")))


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFACE_DEBUG", "1")
    with pytest.raises(ValueError, match="bad"):
        run_cli(raising(ValueError("bad")))


@pytest.mark.parametrize(("argv", "status"), [
    (["tools/eval_verification.py", "--onnx", "missing.onnx", "--bin", "missing.bin"], 1),
    (["tools/export_onnx.py", "--checkpoint", "missing", "--out", "m.onnx", "--opset", "5"], 2),
    (["-m", "sface_dist.train", "missing.yaml"], 1),
])
def test_the_entry_points_follow_it(tmp_path: Path, argv: list[str], status: int) -> None:
    """A tool's error and training's are both 1; a wrong command line is argparse's 2."""
    argv = [str(ROOT / arg) if arg.startswith("tools/") else arg for arg in argv]
    result = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == status, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert last.startswith("error: ") if status == 1 else "error: argument --opset" in last or "--opset must" in last
