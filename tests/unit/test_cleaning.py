"""Cleaning inside a run (``clean``): the sampler's exclusion, the sharded scores against the single-process finder,
the planted noise it finds, and a cleaned run resumed at another world size against the straight run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import sface_dist.training.trainer as trainer_module
from sface_dist.backbones import build_backbone
from sface_dist.checkpoint import load_head_shard, load_trainer_state, read_backbone
from sface_dist.config import CleanConfig, Config, DataConfig, HeadConfig, ModelConfig, OptimConfig, TrainConfig
from sface_dist.data.bin_pack import read_bin
from sface_dist.data.dataset_edits import add_label_noise
from sface_dist.data.datasets import SyntheticFaceDataset
from sface_dist.data.errors import DataError
from sface_dist.data.sampler import EpochShardSampler
from sface_dist.evaluation.embedder import open_model
from sface_dist.evaluation.noisy_labels import score_labels
from sface_dist.evaluation.verification import evaluate_embedder
from sface_dist.heads import ShardedSFaceHead, ShardOptimizer
from sface_dist.parallel.launch import DistEnv
from sface_dist.training.cleaning import CleaningState, drop_sub_centres, embed_images, score_training_images
from sface_dist.training.trainer import Trainer

from rank_launcher import run_ranks
from training_runs import ROOT, torchrun, train_in_process

CLASSES, PER_CLASS, DIM = 6, 4, 16


def test_excluded_images_leave_every_later_epoch_at_every_world_size() -> None:
    """An epoch's order is its permutation without the excluded images, cut into global batches of the same
    images at 1 and at 2 ranks; nothing excluded is served."""
    excluded = np.array([3, 17, 40, 41, 99])
    orders = {}
    for world in (1, 2):
        samplers = [EpochShardSampler(100, 5, rank, world, seed=7, flip=False) for rank in range(world)]
        for sampler in samplers:
            sampler.exclude(excluded[:2])
            sampler.exclude(excluded)
            sampler.set_epoch(2)
        assert samplers[0].kept_images == 95 and len(samplers[0]) == 95 // (5 * world)
        served = [[[s.image_index for s in batch] for batch in sampler] for sampler in samplers]
        orders[world] = [sorted(index for rank_batch in step for index in rank_batch)
                         for step in zip(*served, strict=True)]
    permutation = np.random.default_rng((7, 2)).permutation(100)
    kept = permutation[~np.isin(permutation, excluded)]
    for world, batches in orders.items():
        size = 5 * world
        assert batches == [sorted(kept[b * size : (b + 1) * size].tolist()) for b in range(95 // size)], world
    with pytest.raises(DataError, match="excluding 8 images leaves 4 of 12, less than one global batch of 5"):
        EpochShardSampler(12, 5, 0, 1, seed=0, flip=False).exclude(np.arange(8))


def make_model() -> tuple[torch.nn.Module, SyntheticFaceDataset]:
    torch.manual_seed(3)
    return build_backbone("tiny", DIM), SyntheticFaceDataset(CLASSES, PER_CLASS, 112)


def sharded_scores(rank: int, world: int) -> dict[str, torch.Tensor]:
    backbone, dataset = make_model()
    head = ShardedSFaceHead(CLASSES, DIM, impl="dense", seed=5, sub_centers=2)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    scores, labels, readable = score_training_images(backbone, head, dataset, CleanConfig(batch_size=5), env)
    columns = {**asdict(scores), "labels": labels, "readable": readable}
    return {key: torch.from_numpy(np.asarray(value)) for key, value in columns.items()}


def test_sharded_scores_equal_the_single_process_finder() -> None:
    """2 ranks, each embedding half the images against its shard of a 2-centre head, give every image the scores
    the finder computes in one process from all the embeddings and all the centres."""
    per_rank = run_ranks(sharded_scores, 2)
    backbone, dataset = make_model()
    backbone.eval()
    embeddings, labels, _ = embed_images(backbone, dataset, 0, len(dataset), 24, True, torch.device("cpu"))
    centres = ShardedSFaceHead(CLASSES, DIM, impl="dense", seed=5, sub_centers=2).weight.detach()
    expected = asdict(score_labels(embeddings, labels, centres.view(CLASSES, 2, DIM)))
    for result in per_rank:
        np.testing.assert_array_equal(result["labels"].numpy(), labels.numpy())
        assert bool(result["readable"].all())
        for key, value in expected.items():
            np.testing.assert_allclose(result[key].numpy(), value, atol=1e-5, err_msg=key)


DROP_DEGREES = 40.0


def dropping_head(rank: int, world: int) -> tuple[ShardedSFaceHead, ShardOptimizer]:
    """A 3-centre head shard whose centres are the embeddings of each class's first 3 images (so the 4th image
    decides the dominant one), after one SGD step with momentum on a small fixed gradient."""
    backbone, dataset = make_model()
    backbone.eval()
    embeddings = embed_images(backbone, dataset, 0, len(dataset), 24, True, torch.device("cpu"))[0]
    head = ShardedSFaceHead(CLASSES, DIM, impl="dense", seed=5, sub_centers=3,
                            process_group=None if world == 1 else torch.distributed.group.WORLD)
    centres = embeddings.view(CLASSES, PER_CLASS, DIM)[:, :3].reshape(CLASSES * 3, DIM)
    with torch.no_grad():
        head.weight.copy_(centres[head.class_start * 3 : head.class_end * 3])
    optimizer = ShardOptimizer(head, lr=0.1, momentum=0.9)
    gradient = 0.01 * torch.randn(CLASSES * 3, DIM, generator=torch.Generator().manual_seed(9))
    head.weight.grad = gradient[head.class_start * 3 : head.class_end * 3].clone()
    optimizer.step(None)
    return head, optimizer


def drop_on_ranks(rank: int, world: int) -> dict[str, torch.Tensor]:
    backbone, dataset = make_model()
    head, optimizer = dropping_head(rank, world)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    state = CleaningState.empty()
    drop_sub_centres(backbone, head, optimizer, dataset, CleanConfig(batch_size=5), DROP_DEGREES, env, state, 2)
    return {"weight": head.weight.detach().clone(), "momentum": optimizer.state_dict()["rows"]["momentum_buffer"],
            "excluded": torch.from_numpy(state.excluded), "dropped_after": torch.tensor(state.dropped_after),
            "sub_centers": torch.tensor(head.sub_centers)}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_sub_centre_drop_matches_a_single_process_reference(world: int) -> None:
    """Dominant centre by assignment count, images beyond the angle left out, one centre a class kept with its
    optimizer state: the shards of 1-3 ranks together equal the rule applied in fp64 to every embedding at once."""
    per_rank = run_ranks(drop_on_ranks, world)
    backbone, dataset = make_model()
    backbone.eval()
    embeddings, labels, _ = embed_images(backbone, dataset, 0, len(dataset), 24, True, torch.device("cpu"))
    head, optimizer = dropping_head(0, 1)
    weight = head.weight.detach().double().view(CLASSES, 3, DIM)
    centres = weight / weight.norm(dim=2, keepdim=True)
    cosines = torch.stack([centres[label] @ embedding for embedding, label in zip(embeddings.double(), labels)])
    counts = torch.zeros(CLASSES, 3)
    for label, nearest in zip(labels.tolist(), cosines.argmax(dim=1).tolist()):
        counts[label, nearest] += 1
    dominant = torch.tensor([max(range(3), key=lambda k: (counts[c, k], -k)) for c in range(CLASSES)])
    far = [i for i in range(len(labels)) if cosines[i, dominant[labels[i]]] < np.cos(np.deg2rad(DROP_DEGREES))]
    assert 0 < len(far) < len(labels) and len(set(dominant.tolist())) > 1, "the problem must exercise the rule"
    momentum = optimizer.state_dict()["rows"]["momentum_buffer"]
    rows = torch.arange(CLASSES)
    # the ranks embed with one thread, this process with more: the centres they start from agree to rounding
    kept = head.weight.detach().view(CLASSES, 3, DIM)[rows, dominant]
    torch.testing.assert_close(torch.cat([r["weight"] for r in per_rank]), kept, rtol=0, atol=1e-6)
    kept_momentum = momentum[rows, dominant]
    torch.testing.assert_close(torch.cat([r["momentum"] for r in per_rank]), kept_momentum, rtol=0, atol=1e-6)
    for result in per_rank:
        assert result["excluded"].tolist() == far
        assert int(result["dropped_after"]) == 2 and int(result["sub_centers"]) == 1


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 synthetic identities x 20 images with 20% of the labels moved to another identity (corrupted.json)."""
    root = tmp_path_factory.mktemp("noisy")
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(root / "source"), "--identities", "60",
                    "--images", "20", "--heldout", "30", "--pairs", "300"], cwd=ROOT, check=True, capture_output=True)
    corrupted = add_label_noise(root / "source", root / "noisy", 0.2, 0.0, None, seed=0, progress=False)
    (root / "noisy" / "corrupted.json").write_text(json.dumps([asdict(record) for record in corrupted]))
    return root


def config(noisy: Path, output: Path, steps: int, clean_after: int, checkpoint_every: int) -> Path:
    path = output.with_suffix(".yaml")
    path.write_text(
        f"data: {{backend: torch, root: {noisy / 'noisy'}, batch_size: 32, num_workers: 0, flip: false}}\n"
        f"model: {{backbone: tiny, embedding_size: 64}}\n"
        f"optim: {{lr: 0.1, warmup_steps: 10}}\n"
        f"train: {{output: {output}, steps: {steps}, log_every: 1, checkpoint_every: {checkpoint_every}, "
        f"keep_checkpoints: 10}}\n"
        f"eval: {{bins: [], every: 1000}}\n"
        f"clean: {{at_epochs: [{clean_after}], corrupted: {noisy / 'noisy' / 'corrupted.json'}}}\n"
    )
    return path


CLEANING = re.compile(r"^cleaning after epoch (\d+): (\d+) suspects of (\d+) images, (\d+) newly left out.*precision "
                      r"([0-9.]+), recall ([0-9.]+) \((\S+)\)$", re.MULTILINE)


def resume_from(checkpoint: Path, output: Path, nproc: int, config: Path, *overrides: str) -> str:
    """The run of ``config`` resumed from a copy of ``checkpoint`` in ``output`` on ``nproc`` ranks: its log."""
    (output / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, output / "checkpoints" / checkpoint.name)
    (output / "checkpoints" / "latest").write_text(checkpoint.name)
    return torchrun(nproc, config, f"train.output={output}", *overrides)


def test_a_cleaned_run_stopped_after_cleaning_resumes_on_the_same_images(noisy_data: Path, tmp_path: Path) -> None:
    """Cleaning after epoch 4 (148 steps of 32 of the 1,200 images): the planted noise found well above chance, its
    files written, and a checkpoint right after it. Resumed from that checkpoint on 1 rank the run ends with the
    straight run's weights; on 2 ranks (2 x 16 images a step) it trains on the same kept images without cleaning
    again. (Its weights differ from the straight run's by batch norm's statistics, which each rank takes over
    its own 16 images.)"""
    straight_config = config(noisy_data, tmp_path / "straight", 155, 4, 1000)
    log = torchrun(1, straight_config)
    found = CLEANING.search(log)
    assert found is not None, log
    epoch, suspects, images, newly, precision, recall, folder = found.groups()
    assert (int(epoch), int(images), int(newly)) == (4, 1200, int(suspects))
    # Flagging as many images at random finds the noise at its rate (precision 0.2) and recall the flagged share
    # (465 of 1,200 here: 0.39); the finder's rule must do more than twice as well on both.
    share = int(suspects) / int(images)
    assert float(precision) > 2 * 0.2 and float(recall) > min(0.8, 2 * share), found.group(0)
    listed = (Path(folder) / "exclude.txt").read_text().split()
    assert len(listed) == int(suspects) and (Path(folder) / "suspects.csv").is_file()
    cleaned = tmp_path / "straight" / "checkpoints" / "step-00000148"
    state = load_trainer_state(cleaned)["cleaning"]
    assert state["cleaned_epochs"] == [4] and len(state["excluded"]) == int(suspects)

    kept = f"on {1200 - int(suspects)} images"
    one = resume_from(cleaned, tmp_path / "one", 1, straight_config)
    two = resume_from(cleaned, tmp_path / "two", 2, straight_config, "data.batch_size=16")
    for resumed in (one, two):
        assert "at step 148" in resumed and kept in resumed and "cleaning after" not in resumed, resumed
    final = "step-00000155"
    assert load_trainer_state(tmp_path / "two" / "checkpoints" / final)["cleaning"]["cleaned_epochs"] == [4]
    ours, theirs = (read_backbone(tmp_path / run / "checkpoints" / final)[1] for run in ("one", "straight"))
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-7, msg=name)


DROPPED = re.compile(r"^sub-centres dropped after epoch 2: each class keeps its dominant centre \(nearest to "
                     r"[0-9.]+% of the 1200 images\); (\d+) images farther than 75 degrees", re.MULTILINE)


def test_sub_center_arcface_drops_to_one_centre_and_resumes_on_two_ranks(noisy_data: Path, tmp_path: Path) -> None:
    """Sub-center ArcFace (3 centres) with the drop after epoch 2: the run says what it kept and left out, its
    checkpoint right after holds one centre a class, and a resume from it on 2 ranks trains on without dropping
    again."""
    path = config(noisy_data, tmp_path / "subcentres", 80, 99, 1000)
    path.write_text(path.read_text().replace("clean: {at_epochs: [99]", "clean: {at_epochs: []") +
                    "head: {type: arcface, sub_centers: 3, sub_center_drop_epoch: 2, init: normal}\n")
    log = torchrun(1, path)
    dropped = DROPPED.search(log)
    assert dropped is not None, log
    dropped_checkpoint = tmp_path / "subcentres" / "checkpoints" / "step-00000074"
    assert load_trainer_state(dropped_checkpoint)["cleaning"]["sub_centers_dropped_after"] == 2
    head_state, optimizer_state = load_head_shard(dropped_checkpoint, (0, 60), 60)
    assert head_state["rows"]["weight"].shape == (60, 64)
    assert optimizer_state["rows"]["momentum_buffer"].shape == (60, 64)
    kept = f"on {1200 - int(dropped.group(1))} images"
    resumed = resume_from(dropped_checkpoint, tmp_path / "two", 2, path, "data.batch_size=16")
    assert "at step 74" in resumed and kept in resumed and "sub-centres dropped" not in resumed, resumed
    assert load_head_shard(tmp_path / "two" / "checkpoints" / "step-00000080", (0, 60), 60)[0]["rows"][
        "weight"].shape == (60, 64)


def test_a_drop_that_would_leave_too_few_images_is_one_line(tmp_path: Path) -> None:
    """A sub-centre drop at an angle no image is within leaves nothing to train on: one line naming the step and
    the keys to change, exit status 1."""
    command = [sys.executable, "-m", "sface_dist.train", "configs/demo.yaml", *(item for value in (
        "data.backend=synthetic", "data.num_classes=8", "data.synthetic_images_per_class=8", "data.batch_size=16",
        "data.num_workers=0", "model.embedding_size=16", "head.type=arcface", "head.sub_centers=2",
        "head.sub_center_drop_epoch=1", "head.sub_center_drop_degrees=0.01", "train.steps=8", "train.epochs=0",
        "eval.bins=[]", f"train.output={tmp_path / 'run'}") for item in ("--set", value))]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == ("error: the sub-centre drop after epoch 1: excluding 64 images leaves 0 of 64, less "
                             "than one global batch of 16: drop later (head.sub_center_drop_epoch) or at a wider angle "
                             "(head.sub_center_drop_degrees)\n")


def mlp_backbone(*_: Any, embedding_size: int = 16, **__: Any) -> nn.Module:
    """A backbone without batch norm, so that a step is the same at every world size (batch norm's statistics
    would see each rank's images, not the global batch)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 14 * 14, 32), nn.Tanh(),
                         nn.Linear(32, embedding_size))


def cleaned_run_worker(rank: int, world: int, output: str, checkpoint: str | None) -> dict[str, Any]:
    """Train 8 synthetic identities x 8 images in global batches of 16 to step 14, cleaning after epoch 2 (step 8)
    with a rule strict enough to leave images out; from ``checkpoint`` when given. The weights at the end."""
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    if checkpoint is not None and rank == 0:
        (Path(output) / "checkpoints").mkdir(parents=True)
        shutil.copytree(checkpoint, Path(output) / "checkpoints" / Path(checkpoint).name)
        (Path(output) / "checkpoints" / "latest").write_text(Path(checkpoint).name)
    cfg = Config(
        data=DataConfig(backend="synthetic", num_classes=8, synthetic_images_per_class=8, batch_size=16 // world,
                        num_workers=0, flip=False),
        model=ModelConfig(backbone="tiny", embedding_size=16),
        head=HeadConfig(s=30.0, k=4.0, a=1.2, b=1.4),
        optim=OptimConfig(lr=0.05, warmup_steps=0, grad_clip=0.0),
        train=TrainConfig(output=output, steps=14, checkpoint_every=1000, keep_checkpoints=10, log_every=14),
        clean=CleanConfig(at_epochs=[2], mads=1.0, batch_size=32),
    )
    if world > 1:
        dist.barrier()
    with mock.patch.object(trainer_module, "build_backbone", mlp_backbone):
        trainer = Trainer(cfg, env)
    try:
        trainer.fit()
        return {"backbone": {name: p.detach().clone() for name, p in trainer.backbone.named_parameters()},
                "head": trainer.head.weight.detach().clone(),
                "excluded": torch.from_numpy(trainer.cleaning.excluded.copy())}
    finally:
        trainer.close()


def test_a_run_cleaned_and_resumed_at_another_world_size_ends_with_the_straight_runs_weights(tmp_path: Path) -> None:
    """The straight run on 1 rank cleans after epoch 2 and trains on to step 14; the same run resumed on 2 ranks
    from the checkpoint written right after the cleaning ends with the same weights and the same images left out
    (a backbone without batch norm: tests/unit/test_sharding.py holds the head's sharding to fp64)."""
    straight = cleaned_run_worker(0, 1, str(tmp_path / "straight"), None)
    cleaned = tmp_path / "straight" / "checkpoints" / "step-00000008"
    assert load_trainer_state(cleaned)["cleaning"]["cleaned_epochs"] == [2]
    assert 0 < len(straight["excluded"]) < 32, straight["excluded"]
    resumed = run_ranks(cleaned_run_worker, 2, str(tmp_path / "resumed"), str(cleaned))
    for rank in resumed:
        assert torch.equal(rank["excluded"], straight["excluded"])
    torch.testing.assert_close(torch.cat([rank["head"] for rank in resumed]), straight["head"], rtol=1e-5, atol=1e-6)
    for name, value in straight["backbone"].items():
        for rank in resumed:
            torch.testing.assert_close(rank["backbone"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def planted_noise_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """40 synthetic identities x 20 images, a clean pack of 2,000 pairs of 20 others, and two copies with 20% of
    the labels moved to another identity (seeds 0 and 1, each with its corrupted.json)."""
    root = tmp_path_factory.mktemp("planted")
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(root / "source"), "--identities", "40",
                    "--images", "20", "--heldout", "20", "--pairs", "2000"], cwd=ROOT, check=True, capture_output=True)
    copies = []
    for seed in (0, 1):
        corrupted = add_label_noise(root / "source", root / f"noisy{seed}", 0.2, 0.0, None, seed=seed, progress=False)
        (root / f"noisy{seed}" / "corrupted.json").write_text(json.dumps([asdict(record) for record in corrupted]))
        copies.append(root / f"noisy{seed}")
    return root / "source" / "heldout.bin", copies


def test_cleaning_inside_the_run_finds_the_planted_noise_and_beats_the_same_run_without_it(
    planted_noise_sets: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """The demo config (tiny backbone, SFace) for 250 steps of 32 images (10 epochs) on each noisy copy, with and
    without cleaning after epoch 3, the same seed. Measured (2-core x86 CPU): precision 0.92 and 0.88, recall 0.50
    and 0.48, held-out accuracy 78.9 -> 80.9 and 75.3 -> 78.3.

    Bounds: flagging images at random finds the noise at its rate (precision 0.2) and recall the share flagged
    (about 0.12 here); the rule must reach 3.5 times that precision (0.7) and 3 times that recall (0.35), which
    leaves 0.13-0.22 below what it measured for other CPU kernels' rounding. The cleaned run must end more
    accurate on both seeds."""
    pack, copies = planted_noise_sets
    verification = read_bin(pack)
    for seed, noisy in enumerate(copies):
        planted = {record["key"] for record in json.loads((noisy / "corrupted.json").read_text())}
        accuracy = {}
        for cleaned in (False, True):
            output = tmp_path / f"seed{seed}-{'cleaned' if cleaned else 'straight'}"
            status = train_in_process(
                ROOT / "configs" / "demo.yaml", f"data.root={noisy}", "data.batch_size=32", "data.num_workers=0",
                f"train.output={output}", f"train.seed={seed}", "train.steps=250", "train.epochs=0", "eval.bins=[]",
                "train.checkpoint_every=250", "train.log_every=250", "model.embedding_size=64",
                "optim.warmup_steps=10", "clean.at_epochs=[3]" if cleaned else "clean.at_epochs=[]")
            assert status == 0
            accuracy[cleaned] = evaluate_embedder(open_model(output, None, "cpu").embed, verification,
                                                  batch_size=256).accuracy
        suspects = {int(key) for key in (tmp_path / f"seed{seed}-cleaned" / "cleaning" / "epoch-3" /
                                         "exclude.txt").read_text().split()}
        found = len(suspects & planted)
        assert found / len(suspects) >= 0.7 and found / len(planted) >= 0.35, (seed, len(suspects), found)
        assert accuracy[True] > accuracy[False], (seed, accuracy)
