"""The noisy-label finder: scores against an fp64 brute force, and planted errors found in a trained run."""

from __future__ import annotations

import csv
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sface_dist import train
from sface_dist.data.dataset_edits import add_label_noise
from sface_dist.evaluation.noisy_labels import LabelScores, score_labels

ROOT = Path(__file__).resolve().parents[2]


def test_scores_match_a_brute_force_in_fp64() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(7, 5, generator=gen) * 3
    labels = torch.randint(0, 7, (23,), generator=gen)
    labels[0] = 6  # class 6's only image
    labels[labels == 6] = 5
    labels[0] = 6
    embeddings = centres[labels] / 3 + torch.randn(23, 5, generator=gen)  # near their centres, not all nearest
    scores = score_labels(embeddings, labels, centres, block=3)
    x = embeddings.double() / embeddings.double().norm(dim=1, keepdim=True)
    w = centres.double() / centres.double().norm(dim=1, keepdim=True)
    cos = x @ w.t()
    own = cos[torch.arange(23), labels]
    others = cos.clone()
    others[torch.arange(23), labels] = -np.inf
    np.testing.assert_allclose(scores.own, own.numpy(), atol=1e-6)
    np.testing.assert_allclose(scores.nearest, others.max(dim=1).values.numpy(), atol=1e-6)
    np.testing.assert_array_equal(scores.nearest_class, others.argmax(dim=1).numpy())
    identity = np.full(23, np.nan)
    for i in range(23):
        mates = [j for j in range(23) if j != i and labels[j] == labels[i]]
        if not mates:
            assert np.isnan(scores.identity[i])
            continue
        mean = x[mates].sum(dim=0)
        identity[i] = float(x[i] @ mean / mean.norm())
    np.testing.assert_allclose(scores.identity, identity, atol=1e-6)
    threshold = float(np.nanmedian(identity))
    nearer = {i for i in range(23) if others[i].max() > own[i]}
    apart = {i for i in range(23) if identity[i] < threshold}
    assert nearer - apart and apart - nearer and len(nearer | apart) < 23  # each clause counts
    suspects = scores.suspects(threshold)
    assert set(suspects.tolist()) == nearer | apart
    lead = (others.max(dim=1).values - own).numpy()
    assert list(lead[suspects]) == sorted(lead[suspects], reverse=True)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[int]]:
    """SFace trained on 24 identities x 16 images with 20% of the labels moved to another identity.

    100 steps (8 epochs): the tiny backbone memorises every label, noisy ones too, by ~25 epochs of this
    small set, after which no centre-based finder can tell them apart (docs/noise.md).
    """
    root = tmp_path_factory.mktemp("noise")
    command = [sys.executable, "tools/make_demo_data.py", "--out", str(root / "clean"), "--identities", "24",
               "--images", "16", "--heldout", "4", "--pairs", "20"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    corrupted = add_label_noise(root / "clean" / "train.rec", root / "noisy", closed_fraction=0.2, seed=1,
                                progress=False)
    config = root / "run.yaml"
    config.write_text(
        f"data: {{backend: torch, root: {root / 'noisy'}, batch_size: 32, num_workers: 0}}\n"
        f"model: {{backbone: tiny, embedding_size: 32}}\noptim: {{lr: 0.1, warmup_steps: 10}}\n"
        f"train: {{output: {root / 'run'}, steps: 100, log_every: 100, checkpoint_every: 1000}}\n"
    )
    assert train.main([str(config)]) == 0
    return root / "run", root / "noisy" / "train.rec", {record.key for record in corrupted}


def test_sub_centre_scores_take_each_class_at_its_nearest_centre() -> None:
    """[C, K, D] centres: the own cosine is the largest over the label's K centres, the nearest other class the
    largest over every other class's K (brute force in fp64)."""
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 3, 5, generator=gen)
    labels = torch.randint(0, 6, (19,), generator=gen)
    embeddings = centres[labels, torch.randint(0, 3, (19,), generator=gen)] + 0.5 * torch.randn(19, 5, generator=gen)
    scores = score_labels(embeddings, labels, centres, block=4)
    x = embeddings.double() / embeddings.double().norm(dim=1, keepdim=True)
    w = centres.double() / centres.double().norm(dim=2, keepdim=True)
    cos = torch.einsum("nd,ckd->nck", x, w).amax(dim=2)
    others = cos.clone()
    others[torch.arange(19), labels] = -np.inf
    np.testing.assert_allclose(scores.own, cos[torch.arange(19), labels].numpy(), atol=1e-6)
    np.testing.assert_allclose(scores.nearest, others.max(dim=1).values.numpy(), atol=1e-6)
    np.testing.assert_array_equal(scores.nearest_class, others.argmax(dim=1).numpy())


def test_identity_outliers_lie_the_given_deviations_below_the_median() -> None:
    """The outlier rule against its definition written out with the standard library: the median and the median
    absolute deviation of the identity cosines of the images ``among`` allows (an identity's only image, NaN, never
    counts), the images more than ``mads`` deviations below, lowest first."""
    rng = np.random.default_rng(4)
    identity = rng.uniform(0.2, 0.9, 41).astype(np.float32)
    identity[[3, 17]] = np.nan
    among = rng.random(41) < 0.8
    scores = LabelScores(np.zeros(41, np.float32), np.zeros(41, np.float32), np.zeros(41, np.int64), identity)
    for mads in (0.5, 1.0, 2.0):
        usable = [i for i in range(41) if among[i] and not math.isnan(identity[i])]
        median = statistics.median(float(identity[i]) for i in usable)
        spread = statistics.median(abs(float(identity[i]) - median) for i in usable)
        expected = sorted((i for i in usable if identity[i] < median - mads * spread), key=lambda i: identity[i])
        assert scores.identity_outliers(mads, among=among).tolist() == expected
        assert len(expected) > 0
    every = [i for i in range(41) if not math.isnan(identity[i])]
    median = statistics.median(float(identity[i]) for i in every)
    spread = statistics.median(abs(float(identity[i]) - median) for i in every)
    assert set(scores.identity_outliers(1.0).tolist()) == {i for i in every if identity[i] < median - spread}


def test_finder_recovers_planted_label_errors(noisy_run: tuple[Path, Path, set[int]], tmp_path: Path) -> None:
    run, rec, planted = noisy_run
    result = subprocess.run([sys.executable, "tools/find_noisy_labels.py", "--checkpoint", str(run), "--out",
                             str(tmp_path), "--quiet", "--workers", "1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "suspects.csv") as f:
        rows = list(csv.DictReader(f))
    found = {int(row["key"]) for row in rows}
    assert found == {int(line) for line in (tmp_path / "exclude.txt").read_text().split()}
    precision, recall = len(found & planted) / max(len(found), 1), len(found & planted) / len(planted)
    print(f"finder: {len(found)} suspects, precision {precision:.3f} recall {recall:.3f}")
    # Measured 0.72 / 0.84 here; chance is 0.2 precision. The study's setting is in docs/noise.md.
    assert precision >= 0.6 and recall >= 0.7, (precision, recall)
    scores = np.load(tmp_path / "scores.npz")
    assert sorted(scores["key"].tolist()) == list(range(24 * 16)) and len(scores["own"]) == 24 * 16


def test_finder_on_two_ranks_scores_as_one_process(noisy_run: tuple[Path, Path, set[int]], tmp_path: Path) -> None:
    """Each rank embeds half of the images; the gathered scores are those of a single process."""
    run, _, _ = noisy_run
    command = ["tools/find_noisy_labels.py", "--checkpoint", str(run), "--quiet", "--workers", "1"]
    single = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "one")], cwd=ROOT,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    sharded = subprocess.run([*launcher, *command, "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout.count("suspects of") == 1
    one, two = np.load(tmp_path / "one" / "scores.npz"), np.load(tmp_path / "two" / "scores.npz")
    for name in ("key", "label", "nearest_class"):
        np.testing.assert_array_equal(one[name], two[name])
    for name in ("own", "nearest", "identity"):
        np.testing.assert_allclose(one[name], two[name], atol=1e-5)
    assert (tmp_path / "one" / "exclude.txt").read_text() == (tmp_path / "two" / "exclude.txt").read_text()


def test_finder_refuses_a_dataset_of_another_class_count(noisy_run: tuple[Path, Path, set[int]],
                                                         tmp_path: Path) -> None:
    run, rec, _ = noisy_run
    (tmp_path / "property").write_text("30,112,112\n")
    for name in ("train.rec", "train.idx"):
        (tmp_path / name).write_bytes((rec.parent / name).read_bytes())
    result = subprocess.run([sys.executable, "tools/find_noisy_labels.py", "--checkpoint", str(run), "--rec",
                             str(tmp_path), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"its head has 24 classes, {tmp_path / 'train.rec'} has 30")
    assert "Traceback" not in result.stderr
