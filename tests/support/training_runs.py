"""Training runs on the demo data, in this process (``main(argv)``) or as real launches: their configs, the
entry points and tools they run, and what is read back from their folders and logs."""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (-?[0-9.]+).* lr ([0-9.e+-]+) ", re.MULTILINE)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tool(name: str) -> ModuleType:
    """A script of ``tools/`` imported as a module, so its ``main`` runs in this process."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(
    path: Path, demo_data: Path, output: Path, train_keys: str = "steps: 4, log_every: 2, checkpoint_every: 2"
) -> Path:
    """A config at ``path`` training the tiny backbone on ``demo_data`` into ``output``, evaluating on its pack."""
    path.write_text(
        f"data: {{backend: torch, root: {demo_data}, batch_size: 8, num_workers: 0}}\n"
        f"model: {{backbone: tiny, embedding_size: 32}}\n"
        f"optim: {{lr: 0.05, warmup_steps: 2}}\n"
        f"train: {{output: {output}, {train_keys}}}\n"
        f"eval: {{bins: [{demo_data / 'heldout.bin'}], every: 2, batch_size: 32}}\n"
    )
    return path


def train_in_process(config: Path, *overrides: str) -> int:
    """``python -m sface_dist.train config --set override ...`` in this process: its exit status.

    The trainer is imported here, not with this module, which the conftest imports for every test session.
    """
    from sface_dist import train

    argv = [str(config)]
    for override in overrides:
        argv += ["--set", override]
    return train.main(argv)


def torchrun(nproc: int, config: Path, *overrides: str, timeout: float = 600) -> str:
    """``sface_dist.train`` on ``nproc`` local ranks: its output; a run that fails or does not end within
    ``timeout`` seconds fails the test."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "sface_dist.train", str(config), *(item for value in overrides for item in ("--set", value))]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of ``stderr``, asserting there is no other output of note."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def logged(log: str) -> dict[int, tuple[int, float, float]]:
    """``step -> (total steps, loss, lr)`` of a run's log."""
    return {int(m[1]): (int(m[2]), float(m[3]), float(m[4])) for m in STEP_LINE.finditer(log)}


def copy_run(run: Path, destination: Path) -> Path:
    """A copy of the run folder ``run`` that no run holds (its locks left out)."""
    shutil.copytree(run, destination)
    for lock in destination.rglob(".lock"):
        lock.unlink()
    return destination


def step_dir(run: Path, step: int = 4) -> Path:
    """The checkpoint folder of ``step`` in the run folder ``run``."""
    return run / "checkpoints" / f"step-{step:08d}"
