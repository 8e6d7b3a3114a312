"""Hostile inputs that need real processes (docs/reliability.md): a killed run's lock, resumes on another number
of ranks at an epoch's end, Ctrl-C in a study, torchrun restarts without a fresh rendezvous store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training_runs import ROOT, logged, torchrun, train_in_process, write_config


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


# Resuming at another world size


def resume_copy(run: Path, step: int, into: Path) -> Path:
    """A run folder holding only ``run``'s checkpoint of ``step``: a run stopped there."""
    name = f"step-{step:08d}"
    shutil.copytree(run / "checkpoints" / name, into / "checkpoints" / name)
    (into / "checkpoints" / "latest").write_text(name)
    return into


def test_a_resume_on_more_ranks_with_less_than_a_step_left_in_the_epoch_goes_on(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 rank x 8 stopped at step 23 of a 192-image epoch: 8 images are left, less than the 16 of a step on 2 ranks.
    The resumed run starts the next epoch (it hung here, ranks busy) and ends after the second one."""
    keys = "epochs: 2, steps: 0, log_every: 1, checkpoint_every: 23, keep_checkpoints: 50"
    config = write_config(tmp_path / "c.yaml", demo_data, tmp_path / "straight", keys)
    assert train_in_process(config, "eval.bins=[]", "train.epochs=1") == 0
    resumed = resume_copy(tmp_path / "straight", 23, tmp_path / "resumed")
    log = torchrun(2, config, "eval.bins=[]", f"train.output={resumed}", timeout=180)
    assert "at step 23 (184 samples, epoch 0)" in log
    assert ("at 2 rank(s) x 8: 12 steps of 16 samples left; the run ends after 376 samples (8 fewer than at the 8 "
            "per step it started with), and so does its learning-rate schedule") in log
    steps = logged(log)
    assert min(steps) == 24 and max(steps) == 35 and {total for total, _, _ in steps.values()} == {35}


def test_a_resume_on_fewer_ranks_ends_its_schedule_at_its_last_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """200 images: 2 ranks x 8 fit 12 steps an epoch (192 images), 1 rank x 8 fits 25 (200). Resumed on one rank
    at step 5, the run trains 16 more samples than planned, and its learning rate reaches 0 only after its last
    step (the last steps ran at 0 when the schedule kept the first world size's length)."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(data), "--identities", "25",
                    "--images", "8", "--heldout", "4", "--pairs", "10"], cwd=ROOT, check=True, capture_output=True)
    keys = "epochs: 2, steps: 0, log_every: 1, checkpoint_every: 5, keep_checkpoints: 50"
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "straight", keys)
    torchrun(2, config, "eval.bins=[]", "train.epochs=1", timeout=180)
    resumed = resume_copy(tmp_path / "straight", 5, tmp_path / "resumed")
    capsys.readouterr()
    assert train_in_process(config, "eval.bins=[]", f"train.output={resumed}") == 0
    log = capsys.readouterr().out
    assert ("at 1 rank(s) x 8: 40 steps of 8 samples left; the run ends after 400 samples (16 more than at the 16 "
            "per step it started with), and so does its learning-rate schedule") in log
    steps = logged(log)
    assert max(steps) == 45 and all(lr > 0 for _, _, lr in steps.values()), steps


def test_ctrl_c_in_a_study_is_one_line_and_the_same_command_continues(tmp_path: Path) -> None:
    """Ctrl-C reaches the study and the run it launched: the run stops at a step boundary with its checkpoint, the
    study says one line (it printed a 40-line traceback) and the same command finishes the study."""
    command = [sys.executable, "tools/noise_study.py", "--quick", "--heads", "sface", "--noise", "closed",
               "--steps", "400", "--out", str(tmp_path / "study")]
    study = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    assert study.stdout is not None
    for line in study.stdout:
        if line.startswith("[1/2]"):
            break
    log = tmp_path / "study" / "cells" / "sface-clean-seed0" / "train.log"
    deadline = time.monotonic() + 120
    while "step " not in (log.read_text() if log.is_file() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(study.pid, signal.SIGINT)
    out, err = study.communicate(timeout=120)
    assert study.returncode == 130 and err == "interrupted: run the same command again to continue\n", err
    assert "interrupted at step" in log.read_text()
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in log.read_text()


def test_max_restarts_without_a_fresh_store_per_round_stops_with_one_line(demo_data: Path, tmp_path: Path) -> None:
    """Bare ``torchrun --max-restarts=1``: 2 restarts in 3 ended in gloo's connectFullMesh tracebacks. The ranks
    refuse to start, rank 0 saying why; nothing is trained."""
    config = write_config(tmp_path / "c.yaml", demo_data, tmp_path / "run")
    environment = {name: value for name, value in os.environ.items() if name != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
               "-m", "sface_dist.train", str(config), "--set", "eval.bins=[]"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, env=environment)
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("error: ")}
    assert errors == {"error: torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                      "environment: without it a restart reuses the first round's store and can fail to connect its "
                      "ranks (docs/multinode.md, Restarts after a failure; docker/entrypoint.sh and scripts/slurm set "
                      "it)"}, result.stderr
    assert "connectFullMesh" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()
