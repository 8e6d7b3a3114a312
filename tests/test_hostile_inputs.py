"""Hostile inputs, round two: nothing written outside where the user pointed, nothing of theirs deleted, no hang,
bounded memory, one line per mistake (docs/reliability.md).

Grouped by surface: the run folder, the config, the data tools, checkpoints, evaluation, the tools. Each case
asserts the exact line, the exit status, and that nothing outside the target changed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import ROOT, demo_data, one_error_line, train_in_process, write_config

__all__ = ["demo_data"]  # the fixture, shared with tests/test_faults.py


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes, links as links: what must not change."""
    return {str(path.relative_to(folder)): (os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_symlink() or path.is_file()}


# The run folder


@pytest.mark.parametrize("name", [".lock", "history.jsonl"])
def test_a_link_in_the_run_folder_is_refused_and_its_target_untouched(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    capsys.readouterr()
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "eval.bins=[]") == 1
    what = "the lock is written to" if name == ".lock" else "the run's history is appended to"
    assert one_error_line(capsys.readouterr().err) == (
        f"error: train.output {run}: {run / name} is a symbolic link: refused ({what}; remove the link)")
    assert victim.read_text() == "precious\n" and (run / name).is_symlink()


def test_a_link_named_config_yaml_is_replaced_not_followed(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").symlink_to(victim)
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "eval.bins=[]") == 0
    assert victim.read_text() == "precious\n"
    assert not (run / "config.yaml").is_symlink() and "backbone: tiny" in (run / "config.yaml").read_text()


def test_a_fifo_named_lock_is_one_line_naming_it(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ".lock")
    capsys.readouterr()
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "eval.bins=[]") == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: train.output {run}: {run / '.lock'} is not a regular file: refused (remove it)")


@pytest.mark.faults
def test_the_lock_dies_with_the_run_not_with_its_dataloader_workers(demo_data: Path, tmp_path: Path) -> None:
    """``kill -9`` of the run's process only: its DataLoader worker lives on a few seconds, and the next run starts
    at once instead of being refused in the name of the dead pid."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", demo_data, run, "steps: 100000, log_every: 1, checkpoint_every: 2")
    command = [sys.executable, "-m", "sface_dist.train", str(config), "--set", "data.num_workers=1",
               "--set", "eval.bins=[]"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout is not None
    for line in first.stdout:
        if line.startswith("step 3/"):
            break
    workers = [int(pid) for pid in Path(f"/proc/{first.pid}/task/{first.pid}/children").read_text().split()]
    assert workers, "the run has a DataLoader worker"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    try:
        second = subprocess.run([*command[:-4], "--set", "train.steps=4", "--set", "eval.bins=[]"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert "resumed from" in second.stdout
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
