"""train.sbatch on the real trainer, with stand-ins for SLURM only: pre-emption stops it with a checkpoint and
requeues the job, which resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from slurm_stand_ins import FAKE_SCANCEL, FAKE_SCONTROL, FAKE_SRUN, SYSTEM_PATH, calls, slurm_env, write_tool
from training_runs import ROOT, free_port, write_config


def test_train_sbatch_stops_the_real_trainer_and_the_requeued_job_resumes(
    tmp_path: Path, demo_data: Path
) -> None:
    """train.sbatch with stand-ins for SLURM only: the entrypoint, torchrun and two training ranks are real. SIGUSR1
    to the batch shell checkpoints the step the ranks were in and requeues the job; the requeued job (the same
    script again) resumes from that checkpoint and, finishing, is not requeued."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        write_tool(folder, name, text)
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", demo_data, run, "steps: 100000, log_every: 1, checkpoint_every: 100000")
    env = slurm_env(tmp_path, FAKE_HOSTNAMES="127.0.0.1", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost",
                    SLURM_NNODES="1", SLURM_NODEID="0", SLURM_NTASKS="1", SLURM_GPUS_ON_NODE="2",
                    MASTER_PORT=str(free_port()))
    env["PATH"] = f"{folder}:{Path(sys.executable).parent}:{SYSTEM_PATH}"
    command = ["bash", "scripts/slurm/train.sbatch", str(config), "--set", "eval.bins=[]"]
    batch = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        assert batch.stdout is not None
        for line in batch.stdout:
            if line.startswith("step 3/"):
                break
        batch.send_signal(signal.SIGUSR1)
        out, err = batch.communicate(timeout=180)
    finally:
        if batch.poll() is None:  # torchrun forwards SIGTERM to its workers, which run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(batch.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                batch.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(batch.pid, signal.SIGKILL)
    stopped = re.search(r"^interrupted at step (\d+) by SIGTERM: checkpoint", out, re.MULTILINE)
    assert stopped is not None, f"{out}\n{err}"
    step = int(stopped[1])
    assert (run / "checkpoints" / "latest").read_text() == f"step-{step:08d}"
    assert batch.returncode != 0 and calls(tmp_path, "scancel") == ["--signal=TERM 4242"]
    assert calls(tmp_path, "scontrol")[-1:] == ["requeue 4242"], err

    requeued = subprocess.run([*command, "--set", f"train.steps={step + 2}"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)
    assert requeued.returncode == 0, requeued.stderr
    assert f"resumed from {run / 'checkpoints' / f'step-{step:08d}'} at step {step} " in requeued.stdout
    assert f"step {step + 1}/{step + 2} " in requeued.stdout
    assert calls(tmp_path, "scontrol").count("requeue 4242") == 1
