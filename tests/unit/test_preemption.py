"""Pre-emption and hung peers: docs/multinode.md (Pre-emption) and docs/reliability.md.

A stop signal (Ctrl-C, SIGTERM, SIGUSR1) asks once; signals of another kind join it (a terminal's Ctrl-C, then
torchrun's SIGTERM); the same one repeated after the grace period stops at once; DataLoader workers outlive the
signals meant for their main process; a stop inside an accumulated step loses nothing. Gloo's messages for a
collective that never completes become one line. The launches (several ranks stopped by a signal, a hung peer)
are tests/faults/test_preemption_launches.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sface_dist.checkpoint import load_trainer_state
from sface_dist.config import Config, ConfigError, load_config
from sface_dist.parallel.agreement import CollectiveError, naming_collective_failures
from sface_dist.stop_signals import GRACE_S, StopRequest, stop_at_step_boundary
from sface_dist.training.trainer import Trainer

from synthetic_trainer import ENV, make_config
from training_runs import ROOT


def test_first_signal_asks_and_a_copy_of_it_is_ignored() -> None:
    """In this process: the first SIGUSR1 sets the request and is announced once, a copy arriving with it changes
    nothing, and the previous handlers are back afterwards."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    said: list[str] = []
    with stop_at_step_boundary(said.append, lambda: "no checkpoint was written yet") as request:
        assert request == StopRequest()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.signum == signal.SIGUSR1
    assert said == ["SIGUSR1: stopping after this step to write a checkpoint (again to stop at once)"]
    assert {signum: signal.getsignal(signum) for signum in before} == before


SECOND_SIGNAL = """
import os, signal, sys, time
from sface_dist.stop_signals import GRACE_S, stop_at_step_boundary
first, second, after = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
signal.signal(signal.SIGINT, signal.default_int_handler)  # as interactively: a background job starts with it ignored
with stop_at_step_boundary(print, lambda: "the last checkpoint is runs/x/checkpoints/step-00000100") as request:
    os.kill(os.getpid(), first)
    time.sleep(after)
    os.kill(os.getpid(), second)
    time.sleep(3)
print(f"still running, stop requested by {request.signum}")
"""


def second_signal(first: signal.Signals, second: signal.Signals, after: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SECOND_SIGNAL, str(int(first)), str(int(second)), str(after)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("repeated", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_the_same_signal_after_the_grace_period_stops_at_once(repeated: signal.Signals) -> None:
    """The user repeating the signal: one line naming the last checkpoint, then what the signal did before (SIGTERM
    and SIGUSR1 end the process, Ctrl-C raises ``KeyboardInterrupt``)."""
    started = time.monotonic()
    result = second_signal(repeated, repeated, GRACE_S + 0.2)
    assert "still running" not in result.stdout
    assert result.returncode == -repeated, result.stderr
    name = "Ctrl-C" if repeated == signal.SIGINT else repeated.name
    assert result.stdout.splitlines()[-1] == (
        f"{name} again: stopping at once, without a checkpoint of this step; the last checkpoint is "
        "runs/x/checkpoints/step-00000100")
    if repeated == signal.SIGINT:
        assert "KeyboardInterrupt" in result.stderr
    assert time.monotonic() - started < GRACE_S + 4.5


@pytest.mark.parametrize(
    ("first", "second", "after"),
    [(signal.SIGINT, signal.SIGTERM, 0.0), (signal.SIGINT, signal.SIGTERM, GRACE_S + 0.2),
     (signal.SIGUSR1, signal.SIGTERM, GRACE_S + 0.2), (signal.SIGTERM, signal.SIGINT, 0.0)],
    ids=["Ctrl-C-then-torchrun's-SIGTERM", "Ctrl-C-then-SIGTERM-later", "SLURM's-SIGUSR1-then-SIGTERM",
         "SIGTERM-then-Ctrl-C"],
)
def test_another_signal_joins_the_pending_stop(first: signal.Signals, second: signal.Signals, after: float) -> None:
    """Whatever its kind and however late, another stop signal changes nothing: the first one's stop stands."""
    result = second_signal(first, second, after)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"still running, stop requested by {int(first)}"
    assert "stopping at once" not in result.stdout


WORKER = """
import os, sys
from torch.utils.data import DataLoader
from sface_dist.stop_signals import leave_stop_signals_to_the_main_process
class Pids:
    def __len__(self): return 1000
    def __getitem__(self, index): return os.getpid()
loader = DataLoader(Pids(), batch_size=2, num_workers=1, persistent_workers=True,
                    worker_init_fn=leave_stop_signals_to_the_main_process)
batches = iter(loader)
print(int(next(batches)[0]), flush=True)
sys.stdin.readline()
print(sorted({int(next(batches)[0]) for _ in range(100)}), flush=True)
"""


def test_dataloader_workers_outlive_the_signals_and_end_with_their_process() -> None:
    """Signals from another process (torchrun's ``killpg``, SLURM) leave a worker running; the main process still
    ends it when it exits (multiprocessing's SIGTERM from the parent), rather than waiting for it forever."""
    process = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdin is not None
    worker = int(process.stdout.readline())
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        os.kill(worker, signum)  # from this process: not the worker's parent
    time.sleep(0.5)
    out, err = process.communicate("go\n", timeout=30)
    assert process.returncode == 0 and out == f"[{worker}]\n", err


def test_collective_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"^--set train\.collective_timeout_minutes=0: must be > 0, got 0\.0$"):
        load_config(None, ["data.backend=synthetic", "train.collective_timeout_minutes=0"])


def test_a_collective_error_names_the_collective_rank_and_peer() -> None:
    """gloo's two messages for a collective that never completes, turned into one line each."""
    timed_out = "[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 6000ms for send operation to complete"
    closed = textwrap.dedent("""\
        [gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.7]:28552. This is typically caused by
        a remote worker crashing.""")
    with pytest.raises(CollectiveError) as error, naming_collective_failures("all_reduce X", 3, 8, "key=0.1"):
        raise RuntimeError(timed_out)
    assert str(error.value) == ("rank 3: all_reduce X timed out after 0.1 min waiting for one of the other 7 ranks "
                                "(a peer hung or died; key=0.1)")
    with pytest.raises(CollectiveError) as error, naming_collective_failures("all_reduce X", 1, 2):
        raise RuntimeError(closed)
    assert str(error.value) == ("rank 1: all_reduce X failed: rank 0 on 10.0.0.7 closed its connection "
                                "(it stopped or died: see its log)")
    with pytest.raises(RuntimeError, match="^something else$"), naming_collective_failures("all_reduce X", 1, 2):
        raise RuntimeError("something else")


class SignallingLoader:
    """A loader that sends this process SIGUSR1 as it hands out its ``at``-th batch (counted from 0 over epochs)."""

    def __init__(self, loader: Any, at: int) -> None:
        self.loader, self.at, self.handed_out = loader, at, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if self.handed_out == self.at:
                os.kill(os.getpid(), signal.SIGUSR1)
            self.handed_out += 1
            yield batch


def fit_and_close(trainer: Trainer) -> None:
    try:
        trainer.fit()
    finally:
        trainer.close()


@pytest.mark.parametrize("at", [6, 7], ids=["first-micro-batch", "second-micro-batch"])
def test_a_stop_inside_an_accumulated_step_loses_nothing(tmp_path: Path, at: int) -> None:
    """``train.grad_accum: 2``: SIGUSR1 while either micro-batch of step 4 is fetched stops after step 3 (a
    fetched half-step is dropped, not counted); resuming ends with the weights of a run never stopped."""
    def config(name: str) -> Config:
        return make_config(tmp_path / name, batch_size=4, steps=6, grad_accum=2, checkpoint_every=100)

    fit_and_close(Trainer(config("straight"), ENV))
    stopped = Trainer(config("stopped"), ENV)
    stopped.loader = SignallingLoader(stopped.loader, at)  # type: ignore[assignment]
    fit_and_close(stopped)
    assert (stopped.stop_signal, stopped.step) == (signal.SIGUSR1, 3)
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text() == "step-00000003"
    fit_and_close(Trainer(config("stopped"), ENV))
    straight, resumed = (load_trainer_state(tmp_path / name / "checkpoints" / "step-00000006")
                         for name in ("straight", "stopped"))
    assert resumed["progress"] == straight["progress"]
    for key, tensor in straight["backbone"].items():
        torch.testing.assert_close(resumed["backbone"][key], tensor, rtol=0, atol=1e-6, msg=key)
