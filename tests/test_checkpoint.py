"""Checkpoints: written by 3 gloo ranks, the head reloads exactly at other world sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sface_dist.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_head_shard,
    load_trainer_state,
    read_manifest,
    rng_state,
    save_checkpoint,
)
from sface_dist.distributed import class_range

from rank_launcher import run_ranks

NUM_CLASSES, DIM = 10, 4


def full_weight() -> torch.Tensor:
    return torch.arange(NUM_CLASSES * DIM, dtype=torch.float32).reshape(NUM_CLASSES, DIM)


def save_worker(rank: int, world: int, root: str) -> None:
    """Three checkpoints (steps 5, 10, 15) of the same head shard, after one momentum step."""
    start, end = class_range(NUM_CLASSES, rank, world)
    weight = torch.nn.Parameter(full_weight()[start:end].clone())
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.ones_like(weight) * (rank + 1)
    optimizer.step()
    for step in (5, 10, 15):
        save_step(rank, world, root, step, weight, optimizer)


def save_step(
    rank: int, world: int, root: str, step: int, weight: torch.nn.Parameter, optimizer: torch.optim.Optimizer
) -> None:
    start, end = class_range(NUM_CLASSES, rank, world)
    state = TrainerState(step=step, backbone={"w": torch.zeros(2)}, backbone_optimizer={}, rng=rng_state(), progress={})
    save_checkpoint(
        root,
        rank=rank,
        world_size=world,
        trainer_state=state,
        head_weight=weight,
        head_optimizer=optimizer,
        class_range=(start, end),
        num_classes=NUM_CLASSES,
        config={"note": "test"},
        keep=2,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    run_ranks(save_worker, 3, str(root))
    return root


def test_latest_and_pruning(saved: Path) -> None:
    latest = latest_checkpoint(saved)
    assert latest is not None and latest.name == "step-00000015"
    assert sorted(p.name for p in saved.iterdir() if p.is_dir()) == ["step-00000010", "step-00000015"]
    manifest = read_manifest(latest)
    assert manifest["world_size"] == 3 and manifest["step"] == 15
    assert len(manifest["head_files"]) == 3
    assert load_trainer_state(latest).step == 15


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_head_reloads_at_any_world_size(saved: Path, world: int) -> None:
    """Weight and momentum rows land where they belong whatever the new partition."""
    expected_weight = full_weight().clone()
    expected_momentum = torch.zeros(NUM_CLASSES, DIM)
    for rank in range(3):
        start, end = class_range(NUM_CLASSES, rank, 3)
        expected_momentum[start:end] = rank + 1
        expected_weight[start:end] -= 0.1 * (rank + 1)
    path = latest_checkpoint(saved)
    for rank in range(world):
        start, end = class_range(NUM_CLASSES, rank, world)
        weight, momentum = load_head_shard(path, (start, end), NUM_CLASSES)
        torch.testing.assert_close(weight, expected_weight[start:end], rtol=0, atol=0)
        torch.testing.assert_close(momentum, expected_momentum[start:end], rtol=0, atol=0)


def test_class_count_mismatch_is_an_error(saved: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint head has 10 classes, the run has 12"):
        load_head_shard(latest_checkpoint(saved), (0, 6), 12)


def test_no_checkpoint_yet(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
