"""The run folder and resuming, in real processes: a second run on a folder in use, Ctrl-C to the process group,
a resume at another world size and a refusal on two torchrun ranks.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training_runs import ROOT, copy_run, logged, one_error_line, torchrun, train_in_process, write_config


def test_second_run_on_the_same_folder_refuses(demo_data: Path, tmp_path: Path) -> None:
    """A run holding the folder is named by host and pid; the second run writes nothing."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", demo_data, run)
    command = [sys.executable, "-m", "sface_dist.train", str(config), "--set", "train.steps=100000",
               "--set", "train.checkpoint_every=100000", "--set", "eval.every=100000"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        for line in first.stdout:
            if line.startswith("step "):
                break
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1
    line = one_error_line(second.stderr)
    assert f"train.output {run} is in use by another run (host {socket.gethostname()} pid {first.pid}" in line
    assert not (run / "checkpoints").exists()
    # The lock died with its holder: the folder is free again.
    assert train_in_process(config, "train.steps=2") == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(demo_data: Path, tmp_path: Path, workers: int) -> None:
    """SIGINT to the whole process group, as a terminal sends it: checkpoint, exit 130, resumable."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", demo_data, run)
    overrides = ["--set", "train.steps=100000", "--set", "train.checkpoint_every=100000", "--set", "train.log_every=1",
                 "--set", f"data.num_workers={workers}", "--set", "eval.bins=[]"]
    command = [sys.executable, "-m", "sface_dist.train", str(config), *overrides]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step 3/"):
            break
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "error" not in err, err
    stopped = re.search(r"^interrupted at step (\d+) by SIGINT: checkpoint (\S+)$", out, re.MULTILINE)
    assert stopped is not None, out
    step = int(stopped.group(1))
    assert (run / "checkpoints" / "latest").read_text() == f"step-{step:08d}"
    resumed = subprocess.run([*command, "--set", f"train.steps={step + 2}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 3)])
def test_resume_at_another_world_size_keeps_the_schedule(
    demo_data: Path, tmp_path: Path, before: int, after: int
) -> None:
    """An epoch-based run stopped and resumed on another number of ranks keeps its schedule, in samples.

    The resumed run ends after the configured epochs (192 images, 3 epochs: at 3 ranks x 8 each epoch leaves 16
    images out, so it trains 16 fewer samples than at 1 rank), and its learning rate is poly's over the samples it
    trains (docs/configuration.md: warmup, then lr·(1 - progress)^2), ending at its own last step.
    """
    batch, epochs, images = 8, 3, 192
    global_before, global_after = batch * before, batch * after
    stop_step = 5 if before == 2 else 10
    train_keys = f"epochs: {epochs}, steps: 0, log_every: 1, checkpoint_every: {stop_step}, keep_checkpoints: 50"
    config = write_config(tmp_path / "c.yaml", demo_data, tmp_path / "straight", train_keys)
    straight = logged(torchrun(before, config, "eval.bins=[]", "optim.warmup_steps=3"))
    assert max(straight) == epochs * (images // global_before)

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    stop = f"step-{stop_step:08d}"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / stop, resumed_dir / "checkpoints" / stop)
    (resumed_dir / "checkpoints" / "latest").write_text(stop)
    log = torchrun(after, config, "eval.bins=[]", "optim.warmup_steps=3", f"train.output={resumed_dir}")
    assert f"at step {stop_step}" in log
    resumed = logged(log)

    # The learning rate logged at a step is the one computed from the samples trained on before it, in steps of the
    # run's first global batch; the schedule's length is what the resumed run trains.
    samples_at_stop = stop_step * global_before
    final_samples = samples_at_stop + (max(resumed) - stop_step) * global_after
    total, warmup = final_samples / global_before, 3
    for step, (_, _, lr) in resumed.items():
        position = (samples_at_stop + (step - stop_step - 1) * global_after) / global_before
        assert lr == pytest.approx(0.05 * (1 - (position - warmup) / (total - warmup)) ** 2, rel=1e-3), step
    # The resumed run ends at the end of epoch 3: the straight run's samples, up to the dropped remainders.
    assert abs(final_samples - max(straight) * global_before) < epochs * global_after
    assert {total for total, _, _ in resumed.values()} == {max(resumed)}
    epoch, position = divmod(samples_at_stop, images // global_before * global_before)
    assert f"at step {stop_step} ({samples_at_stop} samples, epoch {epoch})" in log
    first_steps_of_next_epoch = (images // global_before * global_before - position) // global_after
    assert min(resumed) == stop_step + 1 and first_steps_of_next_epoch > 0


def test_refusal_on_two_ranks_is_one_line(trained_run: Path, demo_data: Path, tmp_path: Path) -> None:
    """Rank 0 decides about the folder and says why; rank 1 learns the decision and stops without a line."""
    run = copy_run(trained_run, tmp_path / "run")
    config = write_config(tmp_path / "c.yaml", demo_data, run)
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"--log-dir={logs}", "--redirects=3", "-m", "sface_dist.train", str(config),
               "--set", "train.resume=false"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    (rank0,) = logs.glob("*/attempt_0/0/stderr.log")
    (rank1,) = logs.glob("*/attempt_0/1/stderr.log")
    assert f"train.output {run} already holds checkpoints" in one_error_line(rank0.read_text())
    assert "Traceback" not in rank1.read_text() and "error" not in rank1.read_text(), rank1.read_text()
