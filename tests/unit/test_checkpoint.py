"""Checkpoints: written by 3 gloo ranks, the head and its optimizer reload exactly at other world sizes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sface_dist.checkpoint import (
    latest_checkpoint,
    load_head_shard,
    load_trainer_state,
    read_manifest,
    save_checkpoint,
)
from sface_dist.heads import ShardedSFaceHead, ShardOptimizer
from sface_dist.parallel.partition import class_range

from rank_launcher import run_ranks

NUM_CLASSES, DIM = 10, 4


def full_weight() -> torch.Tensor:
    return torch.arange(NUM_CLASSES * DIM, dtype=torch.float32).reshape(NUM_CLASSES, DIM)


def save_worker(rank: int, world: int, root: str) -> None:
    """Three checkpoints (steps 5, 10, 15) of the same head shard, after one momentum step; in ``ROOT/adamw``
    one of a head trained with AdamW (``adamw_root``)."""
    adamw_head_shard, adamw = adamw_head()
    save_step(rank, world, str(adamw_root(Path(root))), 3, adamw_head_shard, adamw)
    head = ShardedSFaceHead(NUM_CLASSES, DIM, impl="dense")
    with torch.no_grad():
        head.weight.copy_(full_weight()[head.class_start : head.class_end])
    optimizer = ShardOptimizer(head, lr=0.1, momentum=0.9, weight_decay=0.0)
    head.weight.grad = torch.ones_like(head.weight) * (rank + 1)
    optimizer.step(None)
    for step in (5, 10, 15):
        save_step(rank, world, root, step, head, optimizer)


def adamw_root(root: Path) -> Path:
    return root.with_name(root.name + "-adamw")


ADAMW_DRAWS = [[0, 3, 4, 7], [3, 5, 9], [0, 1, 3]]
"""Global rows updated at each AdamW step: the rows' step counts end up 2, 1, 0, 3, 1, 1, 0, 1, 0, 1."""


def adamw_head() -> tuple[ShardedSFaceHead, ShardOptimizer]:
    """This rank's head shard (all classes in one process) after AdamW steps on the ADAMW_DRAWS rows."""
    head = ShardedSFaceHead(NUM_CLASSES, DIM, impl="dense", seed=2)
    optimizer = ShardOptimizer(head, name="adamw", lr=0.01, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for draw in ADAMW_DRAWS:
        head.weight.grad = torch.randn(NUM_CLASSES, DIM, generator=gen)[head.class_start : head.class_end]
        local = [row - head.class_start for row in draw if head.class_start <= row < head.class_end]
        optimizer.step(torch.tensor(local, dtype=torch.long))
    return head, optimizer


def save_step(rank: int, world: int, root: str, step: int, head: ShardedSFaceHead, optimizer: ShardOptimizer) -> None:
    state = {"step": step, "backbone": {"w": torch.zeros(2)}, "backbone_optimizer": {}, "rng": {}, "progress": {}}
    save_checkpoint(
        root,
        rank=rank,
        world_size=world,
        trainer_state=state,
        head_state=head.state_dict(),
        head_optimizer_state=optimizer.state_dict(),
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
    assert load_trainer_state(latest)["step"] == 15


def test_the_manifest_records_every_ranks_file_digest(saved: Path) -> None:
    """Each rank's head file, hashed where it was written, and rank 0's trainer state: size and SHA-256."""
    latest = latest_checkpoint(saved)
    assert latest is not None
    files = read_manifest(latest)["files"]
    assert sorted(files) == sorted(p.name for p in latest.iterdir() if p.name != "manifest.json")
    assert len(files) == 4
    for name, record in files.items():
        data = (latest / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name


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
        head, optimizer = load_head_shard(path, (start, end), NUM_CLASSES)
        assert (head["class_start"], head["class_end"], optimizer["name"]) == (start, end, "sgd")
        torch.testing.assert_close(head["rows"]["weight"], expected_weight[start:end], rtol=0, atol=0)
        torch.testing.assert_close(optimizer["rows"]["momentum_buffer"], expected_momentum[start:end], rtol=0, atol=0)


def test_class_count_mismatch_is_an_error(saved: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint head has 10 classes, the run has 12"):
        load_head_shard(latest_checkpoint(saved), (0, 6), 12)


def test_no_checkpoint_yet(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None



def test_adamw_state_repartitions_3_to_1_and_1_to_2_and_3(saved: Path, tmp_path: Path) -> None:
    """Per-row moments and step counts written by 3 ranks load into one process equal to its own training, and
    then step as it does; one process's checkpoint splits into 2 or 3 shards."""
    head, optimizer = adamw_head()
    assert optimizer.state_dict()["rows"]["step"].tolist() == [2, 1, 0, 3, 1, 1, 0, 1, 0, 1]
    reloaded_head = ShardedSFaceHead(NUM_CLASSES, DIM, impl="dense")
    head_state, optimizer_state = load_head_shard(latest_checkpoint(adamw_root(saved)), (0, NUM_CLASSES), NUM_CLASSES)
    reloaded_head.load_state_dict(head_state)
    reloaded = ShardOptimizer(reloaded_head, name="adamw", lr=0.01, weight_decay=0.1)
    reloaded.load_state_dict(optimizer_state)
    for ours, theirs in ((reloaded_head, head), (reloaded, optimizer)):
        for key, value in theirs.state_dict()["rows"].items():
            torch.testing.assert_close(ours.state_dict()["rows"][key], value, rtol=0, atol=0)
    grad = torch.randn(NUM_CLASSES, DIM)
    for each_head, each_optimizer in ((head, optimizer), (reloaded_head, reloaded)):
        each_head.weight.grad = grad.clone()
        each_optimizer.step(torch.tensor([2, 3]))
    torch.testing.assert_close(reloaded_head.weight, head.weight, rtol=0, atol=0)

    save_step(0, 1, str(tmp_path / "one"), 3, head, optimizer)
    full = optimizer.state_dict()["rows"]
    for world, rank in ((2, 0), (2, 1), (3, 0), (3, 1), (3, 2)):
        start, end = class_range(NUM_CLASSES, rank, world)
        shard_head, shard_optimizer = load_head_shard(latest_checkpoint(tmp_path / "one"), (start, end), NUM_CLASSES)
        assert (shard_optimizer["class_start"], shard_optimizer["class_end"]) == (start, end)
        torch.testing.assert_close(shard_head["rows"]["weight"], head.weight.detach()[start:end], rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(shard_optimizer["rows"][key], full[key][start:end], rtol=0, atol=0)
    with pytest.raises(ValueError, match="head optimizer state is adamw's, the run uses sgd"):
        ShardOptimizer(head, lr=0.1).load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize("momentum", [True, False])
def test_head_files_of_the_first_layout_still_load(tmp_path: Path, momentum: bool) -> None:
    """Head files that held ``weight`` and SGD's ``momentum`` (None before any step) load into a head and its SGD."""
    weight = full_weight()
    buffer = -full_weight() if momentum else None
    path = tmp_path / "step-00000007"
    path.mkdir()
    for start, end in ((0, 4), (4, 10)):
        shard = {"class_start": start, "class_end": end, "weight": weight[start:end],
                 "momentum": None if buffer is None else buffer[start:end]}
        torch.save(shard, path / f"head-{start:08d}-{end:08d}.pt")
    manifest = {"step": 7, "world_size": 2, "num_classes": NUM_CLASSES,
                "head_files": ["head-00000000-00000004.pt", "head-00000004-00000010.pt"], "config": {}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    head = ShardedSFaceHead(NUM_CLASSES, DIM, impl="dense")
    optimizer = ShardOptimizer(head, lr=0.1)
    head_state, optimizer_state = load_head_shard(path, (0, NUM_CLASSES), NUM_CLASSES)
    head.load_state_dict(head_state)
    optimizer.load_state_dict(optimizer_state)
    torch.testing.assert_close(head.weight.detach(), weight, rtol=0, atol=0)
    if momentum:
        torch.testing.assert_close(optimizer.state[head.weight]["momentum_buffer"], buffer, rtol=0, atol=0)
    else:
        assert optimizer.state_dict()["rows"] == {}


def test_sub_centre_heads_repartition_by_class_and_refuse_another_count(tmp_path: Path) -> None:
    """A head with 3 centres a class, stepped by AdamW on sampled classes in one process, splits into 2 or 3
    shards whose rows are the classes' [K, D] blocks; each shard loads and steps exactly as the whole head does.
    A one-centre head does not load it."""
    head = ShardedSFaceHead(NUM_CLASSES, DIM, impl="dense", seed=4, sub_centers=3)
    optimizer = ShardOptimizer(head, name="adamw", lr=0.01, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for draw in ADAMW_DRAWS:
        head.weight.grad = torch.randn(NUM_CLASSES * 3, DIM, generator=gen)
        optimizer.step(torch.tensor(draw, dtype=torch.long))
    steps = optimizer.state_dict()["rows"]["step"]
    assert steps.shape == (NUM_CLASSES, 3) and steps[:, 0].tolist() == [2, 1, 0, 3, 1, 1, 0, 1, 0, 1]
    save_step(0, 1, str(tmp_path), 3, head, optimizer)
    path = latest_checkpoint(tmp_path)
    grad = torch.randn(NUM_CLASSES * 3, DIM, generator=gen)
    centres = head.weight.detach().view(NUM_CLASSES, 3, DIM).clone()
    head.weight.grad = grad.clone()
    optimizer.step(torch.tensor([1, 4, 8]))
    stepped = head.weight.detach().view(NUM_CLASSES, 3, DIM)
    for world in (2, 3):
        for rank in range(world):
            start, end = class_range(NUM_CLASSES, rank, world)
            head_state, optimizer_state = load_head_shard(path, (start, end), NUM_CLASSES)
            torch.testing.assert_close(head_state["rows"]["weight"], centres[start:end], rtol=0, atol=0)
            shard = ShardedSFaceHead(NUM_CLASSES, DIM, impl="dense", sub_centers=3)
            shard.class_start, shard.class_end = start, end
            shard.weight = torch.nn.Parameter(torch.empty((end - start) * 3, DIM))
            shard.load_state_dict(head_state)
            shard_optimizer = ShardOptimizer(shard, name="adamw", lr=0.01, weight_decay=0.1)
            shard_optimizer.load_state_dict(optimizer_state)
            shard.weight.grad = grad[start * 3 : end * 3].clone()
            local = torch.tensor([c - start for c in (1, 4, 8) if start <= c < end], dtype=torch.long)
            shard_optimizer.step(local)
            torch.testing.assert_close(shard.weight.detach().view(-1, 3, DIM), stepped[start:end], rtol=0, atol=0)
    one_centre = ShardedSFaceHead(NUM_CLASSES, DIM, impl="dense")
    with pytest.raises(ValueError, match=r"head state holds 3 centre\(s\) a class, the head 1 \(head.sub_centers\)"):
        one_centre.load_state_dict(load_head_shard(path, (0, NUM_CLASSES), NUM_CLASSES)[0])
