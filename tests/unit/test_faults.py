"""Faults and hostile inputs around checkpoints and the run folder: nothing runs, nothing is lost, one line each.

The entry points run in this process (``main(argv)``) where they can, so that each case costs
a fraction of a second; launches with several ranks and signals run real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sface_dist.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from sface_dist.config import ConfigError, load_config
from sface_dist.heads import ShardedSFaceHead, ShardOptimizer

from ijb_sets import make_ijb_set
from training_runs import ROOT, copy_run, one_error_line, step_dir, tool, train_in_process, write_config


class RunsCode:
    """Pickles to a call of ``os.system``: what a crafted checkpoint would run when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a torch checkpoint file that runs a command when loaded without restriction, and its
    digest in the manifest beside it, as whoever crafts a file can: the checksum alone does not stop it."""
    torch.save({"backbone": RunsCode(marker), "weight": torch.zeros(1)}, path)
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return
    content = json.loads(manifest.read_text())
    data = path.read_bytes()
    content["files"][path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest.write_text(json.dumps(content))


def test_planted_pickle_is_the_attack() -> None:
    """The planted file does run its command under an unrestricted load: the tests below test something."""
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"sface-attack-{os.getpid()}"
    path = marker.with_suffix(".pt")
    plant(path, marker)
    try:
        torch.load(path, weights_only=False)
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)
        path.unlink()


def eval_ijb_arguments(checkpoint: Path, data: Path, out: Path) -> list[str]:
    make_ijb_set(out / "IJBC", identities=2)
    return ["--checkpoint", str(checkpoint), "--root", str(out / "IJBC"), "--out", str(out / "ijb"), "--quiet"]


ENTRY_POINTS: dict[str, Callable[[Path, Path, Path], list[str]]] = {
    "eval_verification": lambda ckpt, data, out: ["--checkpoint", str(ckpt), "--bin", str(data / "heldout.bin"),
                                                  "--quiet"],
    "eval_ijb": eval_ijb_arguments,
    "export_onnx": lambda ckpt, data, out: ["--checkpoint", str(ckpt), "--out", str(out / "model.onnx")],
    "embed": lambda ckpt, data, out: ["--checkpoint", str(ckpt), "--rec", str(data / "train.rec"),
                                      "--out", str(out / "e.npy"), "--quiet"],
}


READERS = {
    "trainer.pt": ["train", "bench_head", *ENTRY_POINTS],
    "head": ["train", "bench_head"],
    "backbone.pt": list(ENTRY_POINTS),
}
"""Which entry points read each checkpoint file (the evaluation tools read only the backbone)."""


@pytest.mark.parametrize(
    ("planted", "entry"), [(planted, entry) for planted, entries in READERS.items() for entry in entries]
)
def test_crafted_checkpoint_runs_no_code(
    trained_run: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str, planted: str
) -> None:
    """Each entry point that reads the planted file refuses it with one line naming it; nothing executes."""
    run = copy_run(trained_run, tmp_path / "run")
    marker = tmp_path / "code-ran"
    if planted == "backbone.pt":
        target, checkpoint = run / "best" / "heldout" / "backbone.pt", run / "best" / "heldout"
    elif planted == "head":
        target, checkpoint = next(step_dir(run).glob("head-*.pt")), step_dir(run)
    else:
        target, checkpoint = step_dir(run) / "trainer.pt", step_dir(run)
    plant(target, marker)
    capsys.readouterr()
    if entry == "train":
        status = train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "train.steps=6")
    elif entry == "bench_head":
        with pytest.raises(SystemExit) as exit_info:
            argv = sys.argv
            sys.argv = ["bench_head.py", "--device", "cpu", "--live-pairs", str(checkpoint), "--rows", "16"]
            try:
                tool("bench_head").main()
            finally:
                sys.argv = argv
        status = 1
        print(exit_info.value.code, file=sys.stderr)
    else:
        status = tool(entry).main(ENTRY_POINTS[entry](checkpoint, demo_data, tmp_path))
    stderr = capsys.readouterr().err
    assert not marker.exists(), "the crafted checkpoint ran its command"
    assert status != 0
    line = one_error_line(stderr)
    assert f"{target}: refused: it holds objects other than tensors and plain containers" in line, line


def test_truncated_checkpoint_file_is_one_line(trained_run: Path, tmp_path: Path) -> None:
    """Refused by its recorded size; in a checkpoint without digests, by the unpickler."""
    run = copy_run(trained_run, tmp_path / "run")
    trainer_file = step_dir(run) / "trainer.pt"
    size = trainer_file.stat().st_size
    trainer_file.write_bytes(trainer_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(trainer_file))}: damaged or changed since it was "
                                              rf"written: 1000 bytes, {size} recorded: refused$"):
        load_trainer_state(step_dir(run))
    manifest = step_dir(run) / "manifest.json"
    manifest.write_text(re.sub(r'"files": \{.*?\n  \},\n', "", manifest.read_text(), flags=re.DOTALL))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(trainer_file))}: unreadable checkpoint file"):
        load_trainer_state(step_dir(run))


def test_trainer_checkpoint_holds_only_weights(trained_run: Path) -> None:
    state = load_weights(step_dir(trained_run) / "trainer.pt")
    assert set(state) == {"step", "backbone", "backbone_optimizer", "rng", "progress", "schedulers", "grad_scaler",
                          "cleaning"}
    assert state["progress"] == {"samples": 4 * 8, "epoch": 0, "epoch_samples": 4 * 8, "schedule_batch": 8}
    cleaning = state["cleaning"]
    assert cleaning["excluded"].numel() == 0 and cleaning["cleaned_epochs"] == []
    assert cleaning["sub_centers_dropped_after"] == 0


def save_step(root: Path, step: int, keep: int, value: float = 0.0) -> Path:
    head = ShardedSFaceHead(4, 2, impl="dense")
    with torch.no_grad():
        head.weight.fill_(value)
    state = {"step": step, "backbone": {"w": torch.zeros(1)}, "backbone_optimizer": {}, "rng": {}, "progress": {}}
    return save_checkpoint(root, rank=0, world_size=1, trainer_state=state, head_state=head.state_dict(),
                           head_optimizer_state=ShardOptimizer(head, lr=0.1).state_dict(), num_classes=4,
                           config={}, keep=keep)


def test_pruning_keeps_the_checkpoint_just_written(tmp_path: Path) -> None:
    """Higher-numbered checkpoints of an earlier run do not make pruning delete the new one."""
    for step in (100, 200):
        save_step(tmp_path, step, keep=2)
    written = save_step(tmp_path, 5, keep=1)
    assert written.is_dir() and latest_checkpoint(tmp_path) == written
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000005"]
    save_step(tmp_path, 10, keep=2)
    save_step(tmp_path, 15, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000010", "step-00000015"]


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_checkpoints_below_one_is_a_config_error(keep: int) -> None:
    with pytest.raises(ConfigError, match=rf"^--set train\.keep_checkpoints={keep}: must be > 0, got {keep}$"):
        load_config(None, ["data.backend=synthetic", f"train.keep_checkpoints={keep}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=0", "optim.lr: must be > 0, got 0.0"),
        ("optim.lr=-0.1", "optim.lr: must be > 0, got -0.1"),
        ("optim.lr=.nan", "optim.lr: must be > 0, got nan"),
        ("optim.momentum=1.0", "optim.momentum: must be in [0, 1), got 1.0"),
        ("optim.weight_decay=-5e-4", "optim.weight_decay: must be >= 0, got -0.0005"),
        ("head.s=0", "head.s: must be > 0"),
    ],
)
def test_out_of_range_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.backend=synthetic", override])
    assert str(error.value).startswith(f"--set {override}: {message.split(': ', 1)[1]}")


def test_data_root_may_name_the_rec_itself(demo_data: Path, tmp_path: Path) -> None:
    """As the tools accept a dataset folder or its ``.rec``, so does ``data.root``."""
    config = write_config(tmp_path / "c.yaml", demo_data, tmp_path / "run")
    assert train_in_process(config, f"data.root={demo_data / 'train.rec'}", "train.steps=2", "eval.bins=[]") == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000002"


def test_exponent_floats_are_numbers(tmp_path: Path) -> None:
    """PyYAML reads ``5e-4`` as a string; the config reads it as YAML 1.2 does."""
    config = tmp_path / "c.yaml"
    config.write_text("data: {backend: synthetic}\noptim: {weight_decay: 5e-4, lr: 1E-1}\n")
    cfg = load_config(config, ["head.s=6.4e1"])
    assert (cfg.optim.weight_decay, cfg.optim.lr, cfg.head.s) == (5e-4, 0.1, 64.0)


def test_resume_false_refuses_a_folder_with_checkpoints(
    trained_run: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained_run, tmp_path / "run")
    config = write_config(tmp_path / "c.yaml", demo_data, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert train_in_process(config, "train.resume=false") == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"train.output {run} already holds checkpoints" in line and "train.overwrite=true" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before

    assert train_in_process(config, "train.overwrite=true") == 0
    out = capsys.readouterr().out
    assert "moved the earlier run's checkpoints to" in out and "resumed" not in out
    (aside,) = run.glob("replaced-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == before
    assert (aside / "best" / "heldout" / "backbone.pt").is_file()
    assert sorted(p.name for p in aside.iterdir()) == ["best", "checkpoints", "config.yaml", "history.jsonl",
                                                        "tensorboard"]
    assert len(list((run / "tensorboard").iterdir())) == 1, "the new run's events only"
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"


@pytest.mark.parametrize("kind", ["file", "inside-file"])
def test_unusable_output_path_is_one_line(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    output = blocker if kind == "file" else blocker / "run"
    capsys.readouterr()
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, output)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"train.output {output}" in line


def test_read_only_output_is_one_line(
    demo_data: Path, tmp_path: Path, tmpfs: Callable[[str, str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmpfs("1m", "ro") / "run"
    capsys.readouterr()
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, output)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: train.output {output}: cannot create the run folder: read-only file system"


def test_disk_full_keeps_the_previous_checkpoint(
    trained_run: Path, demo_data: Path, tmp_path: Path, tmpfs: Callable[[str, str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A disk with room for one checkpoint: the next write fails with one line, ``latest`` still resumes."""
    disk = tmpfs("8m", "rw")
    run = disk / "run"
    shutil.copytree(step_dir(trained_run), run / "checkpoints" / "step-00000004")
    (run / "checkpoints" / "latest").write_text("step-00000004")
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (disk_free(disk) - 64 * 1024))
    config = write_config(tmp_path / "c.yaml", demo_data, run)
    capsys.readouterr()
    assert train_in_process(config, "train.steps=6", "eval.bins=[]") == 1
    line = one_error_line(capsys.readouterr().err)
    assert re.fullmatch(rf"error: cannot write checkpoint {re.escape(str(run))}/checkpoints/step-00000006\.tmp\S*: "
                        "no space left on device", line), line
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000004"]
    filler.unlink()
    assert train_in_process(config, "train.steps=6", "eval.bins=[]") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 4" in out
    assert (run / "checkpoints" / "latest").read_text() == "step-00000006"


def disk_free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_non_finite_weights_write_no_checkpoint(
    trained_run: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A diverging run (finite loss, NaN batch-norm statistics) stops before writing; ``latest`` resumes."""
    run = copy_run(trained_run, tmp_path / "run")
    config = write_config(tmp_path / "c.yaml", demo_data, run)
    capsys.readouterr()
    status = train_in_process(config, "train.steps=8", "optim.lr=1e6", "optim.grad_clip=0", "eval.bins=[]")
    assert status == 1
    line = one_error_line(capsys.readouterr().err)
    assert re.match(r"error: step \d+: .* (is not finite|loss is nan)", line) and "step-00000004" in line, line
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    for path in (run / "checkpoints").glob("step-*"):
        weights = load_trainer_state(path)["backbone"].values()
        assert all(torch.isfinite(t).all() for t in weights if t.is_floating_point())
    assert train_in_process(config, "train.steps=6", "eval.bins=[]") == 0
    assert "at step 4" in capsys.readouterr().out


def test_changed_architecture_is_one_line(
    trained_run: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained_run, tmp_path / "run")
    capsys.readouterr()
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "model.embedding_size=64") == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: {step_dir(run)}: model.embedding_size is 32 in the checkpoint and 64 in the config: "
                    "restore it, or start a new run (another train.output, or train.overwrite=true)")


def test_debug_shows_the_traceback(trained_run: Path, demo_data: Path, tmp_path: Path) -> None:
    run = copy_run(trained_run, tmp_path / "run")
    config = write_config(tmp_path / "c.yaml", demo_data, run)
    env = os.environ | {"SFACE_DEBUG": "1"}
    result = subprocess.run([sys.executable, "-m", "sface_dist.train", str(config), "--set", "train.resume=false"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr and "RunDirectoryError" in result.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the lock (which names whoever holds it), by relative path."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != ".lock"}


def test_rerunning_a_finished_run_says_so_and_writes_nothing(
    trained_run: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No checkpoint rewritten, no TensorBoard event, no evaluation: every file stays as it was, byte for byte."""
    run = copy_run(trained_run, tmp_path / "run")
    before = snapshot(run)
    capsys.readouterr()
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        f"{run}: the run finished at step 4 (step-00000004, train.steps=4): nothing to do; raise train.steps to "
        "train on, or start a new run (another train.output, or train.overwrite=true)")
    assert "final verification" not in out
    assert snapshot(run) == before


def test_a_resume_with_another_seed_is_refused_and_writes_nothing(
    trained_run: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained_run, tmp_path / "run")
    before = snapshot(run)
    config = write_config(tmp_path / "c.yaml", demo_data, run)
    capsys.readouterr()
    assert train_in_process(config, "train.seed=1", "data.flip=false", "train.steps=6") == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {step_dir(run)}: data.flip is True in the checkpoint and False in the config; train.seed is 0 in "
        "the checkpoint and 1 in the config: another run: restore them, start a new run (another train.output, or "
        "train.overwrite=true), or accept the change with --set 'train.accept_changes=[data.flip,train.seed]'")
    assert snapshot(run) == before


def test_changes_on_resume_are_printed_and_recorded(
    trained_run: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A longer run with other logging: one line per key, a history entry, the starting config untouched. A moved
    dataset is refused until accepted, then recorded like any change."""
    run = copy_run(trained_run, tmp_path / "run")
    config_before = (run / "config.yaml").read_bytes()
    config = write_config(tmp_path / "c.yaml", demo_data, run)
    capsys.readouterr()
    assert train_in_process(config, "train.steps=6", "train.log_every=3", "eval.bins=[]") == 0
    out = capsys.readouterr().out.splitlines()
    changed = [line for line in out if line.startswith("changed since")]
    assert changed == ["changed since step-00000004: train.steps: 4 -> 6",
                       "changed since step-00000004: train.log_every: 2 -> 3",
                       f"changed since step-00000004: eval.bins: ['{demo_data / 'heldout.bin'}'] -> []"]
    assert (run / "config.yaml").read_bytes() == config_before
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [entry["event"] for entry in history] == ["start", "resume"]
    assert history[1]["step"] == 4 and history[1]["from"] == "step-00000004" and history[1]["world_size"] == 1
    assert history[1]["changes"] == {"train.steps": [4, 6], "train.log_every": [2, 3],
                                     "eval.bins": [[str(demo_data / "heldout.bin")], []]}

    moved = shutil.copytree(demo_data, tmp_path / "moved")
    moved_config = write_config(tmp_path / "moved.yaml", moved, run)
    assert train_in_process(moved_config, "train.steps=8", "eval.bins=[]") == 1
    assert "accept the change with --set 'train.accept_changes=[data.root]'" in one_error_line(
        capsys.readouterr().err)
    assert train_in_process(moved_config, "train.steps=8", "eval.bins=[]", "train.accept_changes=[data.root]") == 0
    assert (f"changed since step-00000006: data.root: '{demo_data}' -> '{moved}' (accepted: "
            "train.accept_changes)") in capsys.readouterr().out
    last = json.loads((run / "history.jsonl").read_text().splitlines()[-1])
    assert last["changes"]["data.root"] == [str(demo_data), str(moved)] and last["step"] == 6


@pytest.mark.parametrize(("key", "message"), [
    ("x.y", "unknown key 'x.y' (expected section.key)"),
    ("model.backbone", "model.backbone cannot change on resume (the checkpoint's tensors would not fit)"),
])
def test_accept_changes_names_keys_whose_state_fits(key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^--set train\.accept_changes=\[{key}\]: {re.escape(message)}"):
        load_config(None, ["data.backend=synthetic", f"train.accept_changes=[{key}]"])
