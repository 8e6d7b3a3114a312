"""torchrun launches: restarts after ``kill -9``, a rank killed inside a checkpoint write, two agents as two
nodes, and a node leaving an elastic run.

Every agent is a real ``torchrun`` subprocess on loopback with c10d rendezvous on a free port and gloo
ranks; whatever happens, ``finally`` kills each agent's and each worker's process group.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sface_dist.checkpoint import latest_checkpoint, load_trainer_state, load_weights

from training_runs import ROOT, free_port, logged, write_config

AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
"""The restart setting docs/multinode.md documents (a fresh store on a fresh port for every rendezvous round), and
one thread per rank, which torchrun sets only for several processes per agent: the same arithmetic in every launch."""
TRAIN_KEYS = "steps: 8, log_every: 1, checkpoint_every: 2, keep_checkpoints: 10"
OVERRIDES = ("eval.bins=[]",)
TIMEOUT = 300


def torchrun_command(
    port: int, log_dir: Path, *, nnodes: str = "1", nproc: int = 2, restarts: int = 0, hook: str | None = None,
    rdzv_conf: str | None = None, args: tuple[str, ...] = (),
) -> list[str]:
    """One torchrun agent joining the c10d rendezvous on ``127.0.0.1:port``, training ``args`` (a config, --set).

    Each worker's output goes to ``log_dir/<run>/attempt_<restart>/<local rank>/stdout.log`` (``attempts``).
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test", "--local-addr=127.0.0.1",
               f"--max-restarts={restarts}", "--monitor-interval=0.5", f"--log-dir={log_dir}", "--redirects=3"]
    if rdzv_conf is not None:
        command.append(f"--rdzv-conf={rdzv_conf}")
    entry = ["tests/support/rank_hooks.py", hook] if hook else ["-m", "sface_dist.train"]
    return [*command, *entry, *args]


def train_args(config: Path, *overrides: str) -> tuple[str, ...]:
    return (str(config), *(item for override in (*OVERRIDES, *overrides) for item in ("--set", override)))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in its own session)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def worker_pid(agent: int, rank: int) -> int | None:
    """The pid of the worker of global ``rank`` under ``agent``, from its environment."""
    for pid in descendants(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID=test" in environ:
            return pid
    return None


def kill_groups(agent: subprocess.Popen[str]) -> None:
    """SIGKILL the agent's process group and every worker's."""
    for pid in [*descendants(agent.pid), agent.pid]:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait(timeout=30)


@contextmanager
def agents(*commands: list[str], logs: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Start each command as an agent in its own session, stdout and stderr to ``logs/agent-I.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen[str]] = []
    try:
        for index, command in enumerate(commands):
            out = open(logs / f"agent-{index}.log", "w")  # noqa: SIM115  (the agent holds it open)
            started.append(subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                            env=os.environ | AGENT_ENV, start_new_session=True))
            out.close()
        yield started
    finally:
        for agent in started:
            kill_groups(agent)


def wait_for(
    condition: str, check: Callable[[], bool], agent: subprocess.Popen[str], timeout: float = TIMEOUT
) -> None:
    """Poll ``check()`` until true; fail naming ``condition`` if the agent ends or time runs out."""
    deadline = time.monotonic() + timeout
    while not check():
        assert agent.poll() is None, f"the agent ended (status {agent.returncode}) before {condition}"
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.05)


def finish(agent: subprocess.Popen[str], log: Path) -> None:
    """Wait for the agent; its log (``agents``) explains a failure."""
    agent.wait(timeout=TIMEOUT)
    assert agent.returncode == 0, log.read_text()


def attempts(log_dir: Path, local_rank: int = 0) -> list[str]:
    """What the worker of ``local_rank`` printed in each of its agent's attempts, in order."""
    logs = log_dir.glob(f"*/attempt_*/{local_rank}/stdout.log")
    return [log.read_text() for log in sorted(logs, key=lambda log: int(log.parts[-3].removeprefix("attempt_")))]


def resumed_step(text: str) -> int:
    line = next(line for line in text.splitlines() if line.startswith("resumed from "))
    return int(line.split(" at step ")[1].split()[0])


def tensors(value: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state, by its dotted path."""
    if isinstance(value, dict):
        return {name: t for key, item in value.items() for name, t in tensors(item, f"{prefix}{key}.").items()}
    return {prefix: value} if isinstance(value, torch.Tensor) else {}


TRAINED_STATE = ("backbone", "backbone_optimizer")
"""What training computes in ``trainer.pt``; the rest (RNG, scheduler counters) is bookkeeping of the process."""


def same_checkpoint(a: Path, b: Path) -> None:
    """Backbone, backbone optimizer and every head file (head shard and its optimizer) bitwise equal."""
    names = sorted(p.name for p in a.glob("head-*.pt"))
    assert names and names == sorted(p.name for p in b.glob("head-*.pt"))
    pairs = [(load_weights(a / name), load_weights(b / name)) for name in names]
    trainer_a, trainer_b = load_weights(a / "trainer.pt"), load_weights(b / "trainer.pt")
    pairs += [(trainer_a[key], trainer_b[key]) for key in TRAINED_STATE]
    for left, right in map(lambda pair: (tensors(pair[0]), tensors(pair[1])), pairs):
        assert left.keys() == right.keys() and left
        differing = [name for name in left if not torch.equal(left[name], right[name])]
        assert not differing, f"{a} and {b} differ in {differing}"


@pytest.fixture(scope="module")
def straight_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted 8-step run of one agent with 2 ranks: its final checkpoint and its log."""
    tmp = tmp_path_factory.mktemp("straight")
    config = write_config(tmp / "c.yaml", demo_data, tmp / "run", TRAIN_KEYS)
    with agents(torchrun_command(free_port(), tmp / "logs", args=train_args(config)), logs=tmp) as (agent,):
        finish(agent, tmp / "agent-0.log")
    (text,) = attempts(tmp / "logs")
    return tmp / "run" / "checkpoints" / "step-00000008", text


def losses(text: str) -> dict[int, float]:
    return {step: loss for step, (_, loss, _) in logged(text).items()}


@pytest.mark.parametrize("trial", range(5))
def test_kill_9_of_a_rank_restarts_and_resumes_exactly(
    demo_data: Path, straight_run: tuple[Path, str], tmp_path: Path, trial: int
) -> None:
    """``--max-restarts=1``: rank 1 SIGKILLed after the first checkpoint; the restart resumes from ``latest``,
    loses at most the checkpoint interval, and ends bit for bit where the uninterrupted run does."""
    config = write_config(tmp_path / "c.yaml", demo_data, tmp_path / "run", TRAIN_KEYS)
    checkpoints, log = tmp_path / "run" / "checkpoints", tmp_path / "agent-0.log"
    command = torchrun_command(free_port(), tmp_path / "logs", restarts=1, args=train_args(config))
    with agents(command, logs=tmp_path) as (agent,):
        wait_for("the first checkpoint", (checkpoints / "latest").is_file, agent)
        victim = worker_pid(agent.pid, rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        finish(agent, log)
    killed, restarted = attempts(tmp_path / "logs")
    done_before_kill, resumed = max(logged(killed)), resumed_step(restarted)
    assert 2 <= resumed <= done_before_kill <= resumed + 2
    straight_final, straight_log = straight_run
    assert losses(restarted) == {step: loss for step, loss in losses(straight_log).items() if step > resumed}
    same_checkpoint(checkpoints / "step-00000008", straight_final)


def test_rank_killed_inside_a_checkpoint_write_leaves_the_previous_checkpoint(
    demo_data: Path, straight_run: tuple[Path, str], tmp_path: Path
) -> None:
    """Rank 0 SIGKILLed with ``step-00000004.tmp`` fully written but not yet renamed: ``latest`` and resume
    pick step 2; a launch that is killed the same way again restarts and resumes from step 2 once more."""
    config = write_config(tmp_path / "c.yaml", demo_data, tmp_path / "run", TRAIN_KEYS)
    checkpoints = tmp_path / "run" / "checkpoints"
    hook = "kill-before-publish=4"
    command = torchrun_command(free_port(), tmp_path / "a" / "logs", hook=hook, args=train_args(config))
    with agents(command, logs=tmp_path / "a") as (agent,):
        agent.wait(timeout=TIMEOUT)
    assert agent.returncode != 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002", "step-00000004.tmp"]
    assert sorted(p.name for p in (checkpoints / "step-00000004.tmp").iterdir()) == [
        "head-00000000-00000012.pt", "head-00000012-00000024.pt", "manifest.json", "trainer.pt"]
    assert latest_checkpoint(checkpoints) == checkpoints / "step-00000002"
    assert load_trainer_state(latest_checkpoint(checkpoints))["step"] == 2

    log = tmp_path / "b" / "agent-0.log"
    command = torchrun_command(free_port(), tmp_path / "b" / "logs", restarts=1, hook=hook, args=train_args(config))
    with agents(command, logs=tmp_path / "b") as (agent,):
        finish(agent, log)
    killed, restarted = attempts(tmp_path / "b" / "logs")
    assert resumed_step(killed) == 2 and resumed_step(restarted) == 2
    straight_final, straight_log = straight_run
    assert losses(restarted) == {step: loss for step, loss in losses(straight_log).items() if step > 2}
    same_checkpoint(checkpoints / "step-00000008", straight_final)
    assert not (checkpoints / "step-00000004.tmp").exists()


def test_two_agents_as_two_nodes_train_as_one_agent_with_two_ranks(
    demo_data: Path, straight_run: tuple[Path, str], tmp_path: Path
) -> None:
    """``--nnodes=2``, one process per agent: each rank logs the same losses as the other and as one agent
    with two processes, and the final checkpoint is bitwise the single agent's."""
    config = write_config(tmp_path / "c.yaml", demo_data, tmp_path / "run", TRAIN_KEYS)
    port = free_port()
    nodes = [torchrun_command(port, tmp_path / f"node{i}", nnodes="2", nproc=1, hook="every-rank-logs",
                              args=train_args(config)) for i in range(2)]
    with agents(*nodes, logs=tmp_path) as started:
        for index, agent in enumerate(started):
            finish(agent, tmp_path / f"agent-{index}.log")
    (node0,), (node1,) = attempts(tmp_path / "node0"), attempts(tmp_path / "node1")
    straight_final, straight_log = straight_run
    assert losses(node0) == losses(node1) == losses(straight_log)
    assert len(losses(straight_log)) == 8
    same_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000008", straight_final)


def test_a_node_leaving_an_elastic_run_leaves_the_survivor_training_alone(
    demo_data: Path, tmp_path: Path
) -> None:
    """``--nnodes=1:2``: node B (agent and rank) is SIGKILLed after a checkpoint; node A's agent restarts on
    its own, re-partitions the head from 2 ranks to 1 and continues the loss exactly as a single process
    resumed from the same checkpoint does."""
    config = write_config(tmp_path / "c.yaml", demo_data, tmp_path / "run", TRAIN_KEYS)
    checkpoints = tmp_path / "run" / "checkpoints"
    port = free_port()

    def node(name: str, host: bool) -> list[str]:
        # The survivor hosts the rendezvous store: a store on the node that leaves would leave with it.
        return torchrun_command(port, tmp_path / name, nnodes="1:2", nproc=1, restarts=1, hook="every-rank-logs",
                                rdzv_conf=f"is_host={int(host)},last_call_timeout=5", args=train_args(config))

    with agents(node("B", host=False), node("A", host=True), logs=tmp_path) as (leaving, survivor):
        wait_for("the first checkpoint", (checkpoints / "latest").is_file, survivor)
        kill_groups(leaving)
        finish(survivor, tmp_path / "agent-1.log")
    together, alone = attempts(tmp_path / "A")
    assert "2 rank(s) x 8" in together and "1 rank(s) x 8" in alone
    resumed = resumed_step(alone)
    assert resumed >= 2 and max(losses(together)) <= resumed + 2
    resumed_from = checkpoints / f"step-{resumed:08d}"
    assert len(list(resumed_from.glob("head-*.pt"))) == 2
    # train.steps counts batches of the first world size: each of the 8 - resumed left takes two steps alone.
    final = f"step-{resumed + 2 * (8 - resumed):08d}"
    assert [p.name for p in (checkpoints / final).glob("head-*.pt")] == ["head-00000000-00000024.pt"]

    reference = tmp_path / "reference"
    (reference / "checkpoints").mkdir(parents=True)
    shutil.copytree(resumed_from, reference / "checkpoints" / resumed_from.name)
    (reference / "checkpoints" / "latest").write_text(resumed_from.name)
    command = [sys.executable, "-m", "sface_dist.train", *train_args(config, f"train.output={reference}")]
    single = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                            env=os.environ | AGENT_ENV)
    assert single.returncode == 0, single.stderr
    assert losses(alone) == losses(single.stdout)
    assert sorted(losses(alone)) == list(range(resumed + 1, resumed + 2 * (8 - resumed) + 1))
    same_checkpoint(checkpoints / final, reference / "checkpoints" / final)
