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

import numpy as np
import pytest
import torch

from sface_dist.backbones import build_backbone
from sface_dist.checkpoint import load_trainer_state, read_backbone
from sface_dist.config import CleanConfig
from sface_dist.data.dataset_edits import add_label_noise
from sface_dist.data.datasets import SyntheticFaceDataset
from sface_dist.data.errors import DataError
from sface_dist.data.sampler import EpochShardSampler
from sface_dist.evaluation.noisy_labels import score_labels
from sface_dist.heads import ShardedSFaceHead
from sface_dist.parallel.launch import DistEnv
from sface_dist.training.cleaning import embed_images, score_training_images

from rank_launcher import run_ranks
from training_runs import ROOT, torchrun

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
    with pytest.raises(DataError, match="excluding 8 of 12 images leaves less than one global batch of 5"):
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
