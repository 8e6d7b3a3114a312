"""End to end: demo data -> torchrun with 2 gloo ranks -> checkpoint -> resume on 1 rank."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_runs import ROOT, torchrun

STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (-?[0-9.]+)", re.MULTILINE)


def test_train_checkpoint_and_resume_at_another_world_size(demo_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "e2e.yaml"
    config.write_text(
        f"""
data: {{backend: torch, root: {demo_data}, batch_size: 16, num_workers: 0}}
model: {{backbone: tiny, embedding_size: 64}}
head: {{a: 0.8, b: 1.23}}
optim: {{lr: 0.1, warmup_steps: 5}}
train: {{output: {tmp_path / 'run'}, steps: 36, log_every: 4, checkpoint_every: 24}}
eval: {{bins: [{demo_data / 'heldout.bin'}], every: 1000, batch_size: 32}}
"""
    )
    log = torchrun(2, config)
    losses = [float(m.group(3)) for m in STEP_LINE.finditer(log)]
    assert len(losses) == 9, log
    assert sum(losses[-3:]) < sum(losses[:3]), log
    assert "final verification heldout: accuracy" in log
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000036"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000024", "step-00000036"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    saved = [torch.load(p, weights_only=True) for p in sorted((checkpoints / "step-00000036").glob("head-*.pt"))]
    assert [(s["class_start"], s["class_end"]) for s in saved] == [(0, 12), (12, 24)]

    # train.steps counts steps of the run's first global batch (2 x 16): 8 more of them are 16 steps of 1 x 16.
    resumed = torchrun(1, config, "train.steps=44")
    assert "resumed from" in resumed and "at step 36" in resumed
    steps = [int(m.group(1)) for m in STEP_LINE.finditer(resumed)]
    assert steps == [40, 44, 48, 52], resumed
    assert (checkpoints / "latest").read_text() == "step-00000052"
    merged = torch.load(next((checkpoints / "step-00000052").glob("head-*.pt")), weights_only=True)
    assert (merged["class_start"], merged["class_end"]) == (0, 24)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.root={missing}", "nowhere: no such dataset folder or .rec file"),
        ("data.num_classes=999", "999"),
        ("eval.bins=[{config}]", "e2e.yaml"),
        ("train.stesp=3", "unknown key 'train.stesp'"),
    ],
)
def test_bad_input_ends_with_one_clear_line(demo_data: Path, tmp_path: Path, override: str, message: str) -> None:
    config = small_config(demo_data, tmp_path)
    override = override.format(missing=tmp_path / "nowhere", config=config)
    assert_one_error_line([sys.executable, "-m", "sface_dist.train", str(config), "--set", override], message)


def test_launch_without_rendezvous_ends_with_one_clear_line(demo_data: Path, tmp_path: Path) -> None:
    launch = {name: value for name, value in os.environ.items() if name not in ("MASTER_ADDR", "MASTER_PORT")}
    launch |= {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    command = [sys.executable, "-m", "sface_dist.train", str(small_config(demo_data, tmp_path))]
    assert_one_error_line(command, "MASTER_ADDR is not set", env=launch)


def small_config(demo_data: Path, tmp_path: Path) -> Path:
    config = tmp_path / "e2e.yaml"
    config.write_text(
        f"data: {{backend: torch, root: {demo_data}, batch_size: 8, num_workers: 0}}\n"
        f"model: {{backbone: tiny, embedding_size: 32}}\ntrain: {{output: {tmp_path / 'run'}, steps: 2}}\n"
    )
    return config


def assert_one_error_line(command: list[str], message: str, env: dict[str, str] | None = None) -> None:
    """``command`` exits with 1 and one ``error:`` line containing ``message``, without a traceback."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
