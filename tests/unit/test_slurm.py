"""SLURM launch: docker/entrypoint.sh's mapping and the batch scripts' pre-emption and requeue.

No SLURM here: the job's variables are set by hand, and ``scontrol``, ``srun``, ``scancel`` and the
launched command are small stand-ins on ``PATH`` that record how they were called. The entrypoint's
output is checked against the command lines and variables SLURM's documentation implies (first host
of ``node[03-05]`` is ``node03``); the batch scripts run under bash and get the signals SLURM sends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm_stand_ins import FAKE_SCANCEL, FAKE_SCONTROL, FAKE_SRUN, SYSTEM_PATH, calls, slurm_env, write_tool

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
TIMEOUT_S = 60

PRINT_ARGV = '#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n'
PRINT_ENV = (
    "import json, os\n"
    "names = ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK')\n"
    "print(json.dumps({name: os.environ.get(name) for name in names}))\n"
)

# The trainer (torchrun, or python under one task per GPU): records its arguments, then either exits with
# FAKE_EXIT at once or runs until SIGTERM, which it records before exiting with FAKE_TERM_EXIT (143: 128+15).
FAKE_TRAINER = """#!/bin/bash
echo "$*" > "$FAKE_DIR/trainer.args"
if [[ -n ${FAKE_EXIT:-} ]]; then exit "$FAKE_EXIT"; fi
trap 'echo TERM >> "$FAKE_DIR/trainer.signals"; kill $sleeper; exit "${FAKE_TERM_EXIT:-143}"' TERM
sleep 60 &
sleeper=$!
touch "$FAKE_DIR/trainer.started"
wait $sleeper
"""


def run_entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENTRYPOINT), *command], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    write_tool(folder, "torchrun", PRINT_ARGV)
    return folder


NODE_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[03-05]", "SLURM_NNODES": "3", "SLURM_NODEID": "1",
            "SLURM_NTASKS": "3", "SLURM_GPUS_ON_NODE": "8"}
TORCHRUN_ARGS = ["--nnodes=3", "--node-rank=1", "--nproc-per-node=8", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=node03:29500", "--rdzv-id=4242"]


def test_torchrun_per_node_uses_scontrol_for_the_first_host(tmp_path: Path, bin_dir: Path) -> None:
    write_tool(bin_dir, "scontrol", FAKE_SCONTROL)
    env = slurm_env(tmp_path, FAKE_HOSTNAMES="node03 node04 node05", **NODE_JOB)
    result = run_entrypoint(env, "torchrun", "-m", "sface_dist.train", "configs/ms1m.yaml")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [*TORCHRUN_ARGS, "-m", "sface_dist.train", "configs/ms1m.yaml"]
    assert (tmp_path / "scontrol.calls").read_text() == "show hostnames node[03-05]\n"


def test_torchrun_restarts_meet_in_a_fresh_store(tmp_path: Path, bin_dir: Path) -> None:
    """Restarted attempts need their own rendezvous store (tests/faults/test_launch.py); a value the user set is
    kept."""
    write_tool(bin_dir, "torchrun", "#!/bin/bash\necho \"${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-unset}\"\n")
    result = run_entrypoint(slurm_env(tmp_path, **NODE_JOB), "torchrun", "-m", "sface_dist.train", "c.yaml")
    assert (result.returncode, result.stdout) == (0, "1\n"), result.stderr
    kept = run_entrypoint(slurm_env(tmp_path, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0", **NODE_JOB), "torchrun", "c.yaml")
    assert kept.stdout == "0\n"


def test_torchrun_options_of_the_command_come_last_and_master_settings_are_kept(tmp_path: Path, bin_dir: Path) -> None:
    env = slurm_env(tmp_path, MASTER_ADDR="10.0.0.7", MASTER_PORT="29600", **NODE_JOB)
    result = run_entrypoint(env, "torchrun", "--nproc-per-node=2", "-m", "sface_dist.train", "c.yaml")
    assert result.returncode == 0, result.stderr
    expected = [arg.replace("node03:29500", "10.0.0.7:29600") for arg in TORCHRUN_ARGS]
    assert json.loads(result.stdout) == [*expected, "--nproc-per-node=2", "-m", "sface_dist.train", "c.yaml"]


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node[03-05]", "node03"),
        ("node[03-05,07],gpu1", "node03"),
        ("gpu1,node[03-05,07]", "gpu1"),
        ("node[7,03-05]", "node7"),
        ("rack[2-3]-n[007-009]", "rack2-n007"),
        ("ib-node[11-12]-a,x", "ib-node11-a"),
        ("login", "login"),
    ],
)
def test_first_host_without_scontrol(tmp_path: Path, bin_dir: Path, nodelist: str, first: str) -> None:
    assert shutil.which("scontrol", path=f"{bin_dir}:{SYSTEM_PATH}") is None
    env = slurm_env(tmp_path, **{**NODE_JOB, "SLURM_JOB_NODELIST": nodelist})
    result = run_entrypoint(env, "torchrun", "-m", "sface_dist.train")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[4] == f"--rdzv-endpoint={first}:29500"


def test_one_task_per_gpu_exports_the_ranks(tmp_path: Path, bin_dir: Path) -> None:
    env = slurm_env(tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[12-13]", SLURM_PROCID="9",
                    SLURM_NTASKS="16", SLURM_LOCALID="1")
    result = run_entrypoint(env, "python3", "-c", PRINT_ENV)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"MASTER_ADDR": "gpu12", "MASTER_PORT": "29500", "RANK": "9",
                                         "WORLD_SIZE": "16", "LOCAL_RANK": "1"}


def test_outside_slurm_the_command_runs_unchanged(tmp_path: Path, bin_dir: Path) -> None:
    result = run_entrypoint(slurm_env(tmp_path), "torchrun", "-m", "sface_dist.train", "c.yaml")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["-m", "sface_dist.train", "c.yaml"]
    result = run_entrypoint(slurm_env(tmp_path), "python3", "-c", PRINT_ENV)
    assert set(json.loads(result.stdout).values()) == {None}


@pytest.mark.parametrize(
    ("changes", "command", "message"),
    [
        ({"SLURM_NTASKS": "24"}, "torchrun", "torchrun needs one task per node, got SLURM_NTASKS=24 on SLURM_NNODES=3"),
        ({"SLURM_NODEID": ""}, "torchrun", "SLURM_NODEID is not set"),
        ({}, "python3", "SLURM_PROCID is not set"),
        ({"SLURM_JOB_NODELIST": ""}, "torchrun", "SLURM_JOB_NODELIST is not set"),
    ],
)
def test_a_layout_the_launcher_cannot_serve_is_one_line(
    tmp_path: Path, bin_dir: Path, changes: dict[str, str], command: str, message: str
) -> None:
    result = run_entrypoint(slurm_env(tmp_path, **{**NODE_JOB, **changes}), command, "-c", "pass")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_no_command_is_an_error(tmp_path: Path) -> None:
    result = run_entrypoint(slurm_env(tmp_path))
    assert result.returncode == 2 and "no command given" in result.stderr


BATCH_JOBS = {
    "train.sbatch": ("torchrun", {**NODE_JOB, "SLURM_JOB_NODELIST": "node[01-03]"},
                     " ".join([*TORCHRUN_ARGS, "--shutdown-timeout=150"]).replace("node03", "node01")
                     + " -m sface_dist.train configs/demo.yaml --set train.steps=20"),
    "train_per_gpu.sbatch": ("python", {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-03]",
                                        "SLURM_PROCID": "0", "SLURM_NTASKS": "24", "SLURM_LOCALID": "0"},
                             "-m sface_dist.train configs/demo.yaml --set train.steps=20"),
}


def start_batch(tmp_path: Path, script: str, **fake: str) -> subprocess.Popen[str]:
    """Runs a batch script of scripts/slurm/ by bash on the demo config, with the stand-ins of SLURM and the trainer."""
    trainer, variables, _ = BATCH_JOBS[script]
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL),
                       (trainer, FAKE_TRAINER)):
        write_tool(folder, name, text)
    env = slurm_env(tmp_path, FAKE_HOSTNAMES="node01 node02 node03", **variables, **fake)
    command = ["bash", f"scripts/slurm/{script}", "configs/demo.yaml", "--set", "train.steps=20"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_trainer(tmp_path: Path, batch: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / "trainer.started").exists():
        assert batch.poll() is None, batch.communicate()
        assert time.monotonic() < deadline, "the trainer stand-in did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("script", sorted(BATCH_JOBS))
def test_sigusr1_checkpoints_the_step_then_requeues(tmp_path: Path, script: str) -> None:
    batch = start_batch(tmp_path, script)
    wait_for_trainer(tmp_path, batch)
    batch.send_signal(signal.SIGUSR1)
    _, stderr = batch.communicate(timeout=TIMEOUT_S)
    assert batch.returncode == 128 + signal.SIGTERM, stderr
    assert (tmp_path / "trainer.signals").read_text() == "TERM\n"
    assert calls(tmp_path, "scancel") == ["--signal=TERM 4242"]
    assert calls(tmp_path, "scontrol")[-1:] == ["requeue 4242"]
    assert (tmp_path / "trainer.args").read_text().strip() == BATCH_JOBS[script][2]


@pytest.mark.parametrize(("fake", "status"), [({"FAKE_EXIT": "0"}, 0), ({"FAKE_EXIT": "1"}, 1)])
@pytest.mark.parametrize("script", sorted(BATCH_JOBS))
def test_a_run_that_ends_by_itself_is_not_requeued(
    tmp_path: Path, script: str, fake: dict[str, str], status: int
) -> None:
    batch = start_batch(tmp_path, script, **fake)
    _, stderr = batch.communicate(timeout=TIMEOUT_S)
    assert batch.returncode == status, stderr
    assert calls(tmp_path, "scancel") == [] and "requeue 4242" not in calls(tmp_path, "scontrol")


def test_a_run_that_finishes_after_sigusr1_is_not_requeued(tmp_path: Path) -> None:
    batch = start_batch(tmp_path, "train.sbatch", FAKE_TERM_EXIT="0")
    wait_for_trainer(tmp_path, batch)
    batch.send_signal(signal.SIGUSR1)
    _, stderr = batch.communicate(timeout=TIMEOUT_S)
    assert batch.returncode == 0, stderr
    assert calls(tmp_path, "scancel") == ["--signal=TERM 4242"]
    assert "requeue 4242" not in calls(tmp_path, "scontrol")


def test_sigterm_to_the_batch_shell_waits_for_the_step(tmp_path: Path) -> None:
    batch = start_batch(tmp_path, "train.sbatch")
    wait_for_trainer(tmp_path, batch)
    batch.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        batch.wait(timeout=1.0)
    os.kill(int((tmp_path / "task.pid").read_text()), signal.SIGTERM)
    _, stderr = batch.communicate(timeout=TIMEOUT_S)
    assert batch.returncode == 128 + signal.SIGTERM, stderr
    assert "waiting for the step" in stderr
    assert calls(tmp_path, "scancel") == [] and "requeue 4242" not in calls(tmp_path, "scontrol")
