"""The checkpoint lifecycle (``CheckpointManager``), the readers' API, and that no other module reads the files."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sface_dist.checkpoint import (
    CheckpointError,
    head_classes,
    read_best_score,
    read_head_rows,
    save_best_backbone,
)
from sface_dist.heads import ShardedSFaceHead, ShardOptimizer
from sface_dist.training.checkpoint_manager import CheckpointManager

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_MODULES = {"sface_dist/checkpoint.py", "sface_dist/training/checkpoint_manager.py"}
LAYOUT_NAMES = re.compile(r"trainer\.pt|manifest\.json|backbone\.pt|(^|/)(head|step)-")
"""File names of the layout (``checkpoint``'s module docstring), in a string constant."""
LAYOUT_CONSTANTS = {"LATEST", "MANIFEST", "TRAINER_FILE", "BACKBONE_FILE", "STEP_PREFIX", "load_weights"}
NUM_CLASSES, DIM = 6, 3
CONFIG = {"model": {"backbone": "tiny", "embedding_size": DIM}}


class Component:
    """A component of ``training.state.Stateful``, holding what it is given or loaded."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state or {}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


class Run:
    """The components a manager is handed: ``trainer.pt``'s, and a head shard and its optimizer."""

    def __init__(self) -> None:
        self.trainer = Component()
        self.head, self.optimizer = Component(), Component()


def manager(output: Path, every: int = 5, keep: int = 2, config: dict | None = None,
            class_range: tuple[int, int] = (0, NUM_CLASSES)) -> tuple[CheckpointManager, Run]:
    run = Run()
    checkpoints = CheckpointManager(output, rank=0, world_size=1, every=every, keep=keep, num_classes=NUM_CLASSES,
                                    config=CONFIG if config is None else config,
                                    trainer_state={"trainer": run.trainer},
                                    head_shard={"head": run.head, "optimizer": run.optimizer},
                                    class_range=class_range)
    return checkpoints, run


def save(checkpoints: CheckpointManager, run: Run, step: int) -> Path:
    """A checkpoint of ``step`` whose head row ``c`` is filled with ``c + step``."""
    head = ShardedSFaceHead(NUM_CLASSES, DIM, impl="dense")
    with torch.no_grad():
        head.weight.copy_(torch.arange(NUM_CLASSES, dtype=torch.float32)[:, None].expand(-1, DIM) + step)
    run.trainer.state = {"step": step, "backbone": {"w": torch.zeros(1)}, "backbone_optimizer": {},
                         "rng": {}, "progress": {}}
    run.head.state, run.optimizer.state = head.state_dict(), ShardOptimizer(head, lr=0.1).state_dict()
    return checkpoints.save()


def test_due_follows_the_interval(tmp_path: Path) -> None:
    assert [step for step in range(1, 16) if manager(tmp_path)[0].due(step)] == [5, 10, 15]
    with pytest.raises(ValueError, match="every 0 steps"):
        manager(tmp_path, every=0)


def test_save_keeps_the_last_n_and_resume_reads_a_class_range(tmp_path: Path) -> None:
    checkpoints, run = manager(tmp_path, keep=2)
    assert checkpoints.latest() is None and checkpoints.restore() is None
    for step in (5, 10, 15):
        save(checkpoints, run, step)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == [
        "step-00000010", "step-00000015"]
    checkpoints, run = manager(tmp_path, class_range=(2, 4))
    resumed = checkpoints.restore()
    assert resumed is not None and resumed.path == checkpoints.latest() and run.trainer.state["step"] == 15
    assert run.head.state["rows"]["weight"][:, 0].tolist() == [17.0, 18.0]
    assert (run.optimizer.state["class_start"], run.optimizer.state["class_end"]) == (2, 4)
    assert read_head_rows(resumed.path)[:, 0].tolist() == [15.0 + c for c in range(NUM_CLASSES)]
    assert read_head_rows(resumed.path, 4)[:, 0].tolist() == [19.0, 20.0]


def test_resume_refuses_another_model(tmp_path: Path) -> None:
    save(*manager(tmp_path), 5)
    other, _ = manager(tmp_path, config={"model": {"backbone": "tiny", "embedding_size": 8}})
    with pytest.raises(CheckpointError, match=r"model.embedding_size is 3 in the checkpoint and 8 in the config"):
        other.restore()


def test_best_backbone_round_trip(tmp_path: Path) -> None:
    best = tmp_path / "best" / "lfw"
    assert read_best_score(best) is None
    save_best_backbone(best, nn.Linear(2, 2), step=7, pack="lfw", result={"accuracy": 0.9}, config=CONFIG)
    assert read_best_score(best) == (0.9, 7)
    with pytest.raises(CheckpointError, match="holds no head"):
        head_classes(best)


def layout_uses(path: Path) -> list[str]:
    """Where ``path`` reads or writes checkpoint files itself: ``torch.load``/``torch.save``, a file name of the
    layout in a string (docstrings aside), or an import of the layout's names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "torch" and node.attr in ("load", "save"):
                found.append(f"line {node.lineno}: torch.{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if LAYOUT_NAMES.search(node.value):
                found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and node.module == "sface_dist.checkpoint":
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if a.name in LAYOUT_CONSTANTS]
    return found


def test_only_the_checkpoint_modules_touch_checkpoint_files() -> None:
    sources = sorted([*ROOT.glob("sface_dist/**/*.py"), *ROOT.glob("tools/*.py")])
    offenders = {
        str(path.relative_to(ROOT)): uses
        for path in sources
        if str(path.relative_to(ROOT)) not in CHECKPOINT_MODULES and (uses := layout_uses(path))
    }
    assert offenders == {}


class Unfit(Component):
    """A component whose ``load_state_dict`` finds the checkpoint's part does not fit."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError("the backbone does not fit the config: size mismatch for fc.weight")


def test_a_part_that_does_not_fit_is_one_line_naming_the_checkpoint(tmp_path: Path) -> None:
    checkpoints, run = manager(tmp_path)
    path = save(checkpoints, run, 5)
    unfit = CheckpointManager(tmp_path, rank=0, world_size=1, every=5, keep=2, num_classes=NUM_CLASSES, config=CONFIG,
                              trainer_state={"trainer": Unfit()},
                              head_shard={"head": Component(), "optimizer": Component()},
                              class_range=(0, NUM_CLASSES))
    with pytest.raises(CheckpointError) as raised:
        unfit.restore()
    assert str(raised.value) == f"{path}: the backbone does not fit the config: size mismatch for fc.weight"


def test_components_write_disjoint_keys_and_the_head_file_its_two(tmp_path: Path) -> None:
    shared = {"trainer": Component({"step": 1}), "progress": Component({"step": 1, "progress": {}})}
    overlapping = CheckpointManager(tmp_path, rank=0, world_size=1, every=5, keep=2, num_classes=NUM_CLASSES,
                                    config=CONFIG, trainer_state=shared,
                                    head_shard={"head": Component(), "optimizer": Component()},
                                    class_range=(0, NUM_CLASSES))
    with pytest.raises(ValueError, match=r"component progress writes the keys \['step'\] another one writes"):
        overlapping.save()
    with pytest.raises(ValueError, match=r"head_shard: expected the components \('head', 'optimizer'\)"):
        CheckpointManager(tmp_path, rank=0, world_size=1, every=5, keep=2, num_classes=NUM_CLASSES, config=CONFIG,
                          trainer_state={}, head_shard={"head": Component()}, class_range=(0, NUM_CLASSES))
