"""Pre-emption and hung peers on real launches: docs/multinode.md (Pre-emption) and docs/reliability.md.

A stop signal (Ctrl-C, SIGTERM, SIGUSR1) stops every rank at the next step boundary with a checkpoint and exit
status 128 + the signal, and the run resumes after it. A peer that hangs past
``train.collective_timeout_minutes`` ends each rank with one line naming the collective, and no checkpoint is
published half-written. The launches are real: two ``python -m sface_dist.train`` processes with SLURM's
variables (as ``srun`` starts them), or torchrun.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training_runs import ROOT, free_port, logged, one_error_line, train_in_process, write_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SLURM_SIGNALS = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun's default signals plus SLURM's warning signal: torchrun forwards them to its workers."""
RUN_KEYS = "steps: 100000, log_every: 1, checkpoint_every: 2, keep_checkpoints: 100"


def srun_ranks(world_size: int, command: list[str]) -> list[subprocess.Popen[str]]:
    """``command`` on ``world_size`` ranks as ``srun`` starts them: SLURM's variables, one process group each."""
    env = os.environ | {"SLURM_NTASKS": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen(command, cwd=ROOT, env=env | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in range(world_size)
    ]


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants: every process of a SLURM job step, which SLURM signals one by one."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def wait_for_step(process: subprocess.Popen[str], step: int) -> str:
    """Rank 0's output up to and including the log line of ``step``."""
    assert process.stdout is not None
    seen = ""
    for line in process.stdout:
        seen += line
        if line.startswith(f"step {step}/"):
            return seen
    raise AssertionError(f"the run ended before step {step}: {seen}")


@pytest.mark.parametrize("launch", ["srun, SIGUSR1 to rank 1 only", "torchrun, SIGTERM to its process group",
                                    "torchrun, SIGUSR1 to every process"])
def test_a_signal_stops_every_rank_at_a_step_boundary_and_the_run_resumes(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], launch: str
) -> None:
    """The checkpoint is the step the signal arrived in: the last step logged; the resumed run continues after it.

    ``srun``: two tasks as SLURM starts them; only rank 1 (and its DataLoader worker) gets SIGUSR1, and both
    ranks stop and exit with 138: rank 0 learns it in the step's agreement. torchrun's process group (a
    terminal, ``kill`` on the launcher, SLURM's ``proctrack/pgid``) holds only the launcher, which forwards the
    signal to its workers. Every process (SLURM's ``proctrack/cgroup``): each worker
    gets its own copy and torchrun's, which count once. torchrun exits 1 after its workers stopped by themselves.
    """
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", demo_data, run, RUN_KEYS)
    train = ["-m", "sface_dist.train", str(config), "--set", "data.num_workers=1", "--set", "eval.bins=[]"]
    signum = signal.SIGTERM if "SIGTERM" in launch else signal.SIGUSR1
    if launch.startswith("srun"):
        ranks = srun_ranks(2, [sys.executable, *train])
        rank0 = ranks[0]
    else:
        rank0 = subprocess.Popen([*TORCHRUN, *([SLURM_SIGNALS] if signum == signal.SIGUSR1 else []), *train],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        ranks = [rank0]
    out = wait_for_step(rank0, 3)
    signalled = time.monotonic()
    if launch == "torchrun, SIGUSR1 to every process":
        for pid in process_tree(rank0.pid):
            os.kill(pid, signum)
    elif launch.startswith("srun"):
        os.killpg(ranks[1].pid, signum)
    else:
        os.killpg(rank0.pid, signum)
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    stopped_in = time.monotonic() - signalled
    out += outputs[0][0]

    if launch.startswith("srun"):
        assert [rank.returncode for rank in ranks] == [128 + signum] * 2, outputs
        for _, err in outputs:
            assert err == "", err
    else:
        err = outputs[0][1]
        assert rank0.returncode == 1 and f"got signal: {int(signum)}" in err, err
        assert "forcefully" not in err and "[rank" not in err and "error:" not in err, err
        assert stopped_in < 30, "torchrun's grace period ran out"
    assert_stopped_with_a_checkpoint_and_resumes(out, signum, run, config, capsys)


def assert_stopped_with_a_checkpoint_and_resumes(
    out: str, signum: signal.Signals, run: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rank 0's ``out`` says the run stopped on ``signum`` after the last step it logged (at least step 3), that
    step's checkpoint is ``latest``, and the same config resumed goes on after it."""
    stopped = re.search(rf"^interrupted at step (\d+) by {signum.name}: checkpoint (\S+)$", out, re.MULTILINE)
    assert stopped is not None, out
    step = int(stopped[1])
    assert step >= 3 and max(logged(out)) == step, out
    assert (run / "checkpoints" / "latest").read_text() == f"step-{step:08d}"
    capsys.readouterr()
    assert train_in_process(config, f"train.steps={step + 2}", "eval.bins=[]") == 0
    resumed = capsys.readouterr().out
    assert f"at step {step} (" in resumed and min(logged(resumed)) == step + 1, resumed


def test_ctrl_c_under_timeout_and_torchrun_writes_the_checkpoint(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``timeout 600 torchrun ...`` and Ctrl-C: the terminal signals the whole job (timeout, torchrun, the
    workers); timeout forwards the signal to the job again and torchrun to its workers, and a second copy (a key
    held a moment) reaches torchrun while it waits for them, so it also sends them SIGTERM. Every copy and the
    SIGTERM join the first request: the step in flight ends, its checkpoint is written, and the run resumes
    after it."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", demo_data, run, RUN_KEYS)
    job = subprocess.Popen(["timeout", "600", *TORCHRUN, "tests/support/rank_hooks.py", "slow-stop=2", str(config),
                            "--set", "data.num_workers=1", "--set", "eval.bins=[]"], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    out = wait_for_step(job, 3)
    os.killpg(job.pid, signal.SIGINT)
    time.sleep(0.5)  # the key still held: the copy reaches torchrun while the workers write their checkpoint
    os.killpg(job.pid, signal.SIGINT)
    rest, err = job.communicate(timeout=120)
    out += rest
    assert "closing signal SIGTERM" in err, err
    assert_stopped_with_a_checkpoint_and_resumes(out, signal.SIGINT, run, config, capsys)


@pytest.mark.parametrize(
    ("where", "waiting", "published"),
    [("after-step-3", "all_reduce over the control group", "step-00000002"),
     ("checkpoint-4", "a collective of the checkpoint of step 4", "step-00000002")],
)
def test_a_hung_peer_is_one_line_on_every_rank(
    demo_data: Path, tmp_path: Path, where: str, waiting: str, published: str
) -> None:
    """Rank 0 sleeps past rank 1's timeout (3 s): rank 1 names the collective it waited in and the rank it waited
    for; rank 0, when it wakes, finds rank 1 gone and says so. Both exit 1; ``latest`` names the last complete
    checkpoint and step 4's is not published."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", demo_data, run, RUN_KEYS)
    ranks = srun_ranks(2, [sys.executable, "tests/support/hang_rank.py", "0", "10", where, str(config),
                           "--set", "train.collective_timeout_minutes=0.05", "--set", "train.steps=6",
                           "--set", "eval.bins=[]"])
    outputs = [rank.communicate(timeout=180) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 1], outputs
    hint = "train.collective_timeout_minutes=0.05"
    assert one_error_line(outputs[1][1]) == (
        f"error: rank 1: {waiting} timed out after 0.05 min waiting for rank 0 (a peer hung or died; {hint})"
    )
    line = one_error_line(outputs[0][1])
    assert re.fullmatch(rf"error: rank 0: .* failed: rank 1 on 127\.0\.0\.1 closed its connection "
                        rf"\(it stopped or died: see its log; {re.escape(hint)}\)", line), line
    assert (run / "checkpoints" / "latest").read_text() == published
    assert not (run / "checkpoints" / "step-00000004").exists()
    assert torch.load(run / "checkpoints" / published / "trainer.pt", weights_only=True)["step"] == 2
