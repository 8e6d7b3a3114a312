"""``train.profile``: a ``torch.profiler`` trace of chosen optimizer steps, written under the run folder.

Steps ``[first, last]`` (the numbers the console logs) are traced on every rank: CPU operators, and CUDA kernels
where there is a GPU, each step inside a ``step N`` range. When step ``last`` ends, each rank writes
``OUTPUT/profile/rank<R>.steps<first>-<last>.pt.trace.json``, a Chrome trace that Perfetto (ui.perfetto.dev) opens
and TensorBoard shows with the PyTorch profiler plugin (``tensorboard --logdir OUTPUT/profile``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sface_dist.atomic_write import publish_file, temporary_sibling

PROFILE_DIR = "profile"


class StepProfiler:
    """Traces optimizer steps ``steps = [first, last]`` of this rank (``[]``: none)."""

    def __init__(self, steps: list[int], output: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.folder, self.rank = output / PROFILE_DIR, rank
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.active: profile | None = None

    @property
    def path(self) -> Path:
        return self.folder / f"rank{self.rank}.steps{self.first}-{self.last}.pt.trace.json"

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        """The context of optimizer step ``number``: traced when it is one of ``[first, last]``."""
        if not self.first <= number <= self.last:
            yield
            return
        if self.active is None:
            self.active = profile(activities=self.activities)
            self.active.__enter__()
        with record_function(f"step {number}"):
            yield
        if number == self.last:
            self._write()

    def _write(self) -> None:
        assert self.active is not None
        self.active.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = temporary_sibling(self.path)
        self.active.export_chrome_trace(str(temporary))
        publish_file(temporary, self.path)
        self.active = None

    def close(self) -> None:
        """Stop a trace the run ended in the middle of (a stop signal, an error): nothing is written."""
        if self.active is not None:
            self.active.__exit__(None, None, None)
            self.active = None
