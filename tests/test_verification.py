"""Verification packs (.bin) and the insightface 10-fold verification protocol."""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sface_dist.backbones import build_backbone
from sface_dist.data.bin_pack import VerificationPack, VerificationPackError, read_bin, write_bin
from sface_dist.data.convert import encode_jpeg
from sface_dist.data.synthetic import SyntheticFaces
from sface_dist.distributed import DistEnv
from sface_dist.evaluation.checkpoint_backbone import load_backbone
from sface_dist.evaluation.embedder import TorchEmbedder, embed_images, embed_views
from sface_dist.evaluation.monitor import VerificationMonitor
from sface_dist.evaluation.roc import operating_points, roc_curve
from sface_dist.evaluation.verification import (
    THRESHOLDS,
    VERIFICATION_FARS,
    evaluate_pack,
    kfold_splits,
    verification_accuracy,
)

from rank_launcher import run_ranks


def encode_image(seed: int, size: tuple[int, int] = (112, 112), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def decoded(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def python2_pack(images: list[bytes], issame: list[bool]) -> bytes:
    """A pack as Python 2 pickled it (protocol 2; images are py2 ``str``, i.e. BINSTRING opcodes)."""
    strings = b"".join(b"T" + struct.pack("<I", len(data)) + data for data in images)
    bools = b"".join(b"\x88" if value else b"\x89" for value in issame)
    return b"\x80\x02](" + strings + b"e](" + bools + b"e\x86."


# ---------------------------------------------------------------- bin packs


def test_write_read_round_trip(tmp_path: Path) -> None:
    images = [encode_image(seed) for seed in range(6)]
    issame = [True, False, True]
    path = tmp_path / "lfw.bin"
    write_bin(path, images, issame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lfw.bin"]  # no temp file left behind

    pack = read_bin(path)
    assert pack.name == "lfw"
    assert pack.images.dtype == torch.uint8 and pack.images.shape == (6, 3, 112, 112)
    assert pack.issame.dtype == np.bool_ and pack.issame.tolist() == issame
    for index, data in enumerate(images):
        assert torch.equal(pack.images[index], decoded(data))

    with open(path, "rb") as f:
        assert pickle.load(f) == (images, issame)  # insightface's layout, readable by plain pickle


def test_png_and_grayscale_images_decode_to_rgb(tmp_path: Path) -> None:
    gray = io.BytesIO()
    Image.new("L", (112, 112), color=77).save(gray, format="PNG")
    path = tmp_path / "mixed.bin"
    write_bin(path, [encode_image(1, fmt="PNG"), gray.getvalue()], [False])
    pack = read_bin(path)
    assert torch.equal(pack.images[0], decoded(encode_image(1, fmt="PNG")))
    assert (pack.images[1] == 77).all()


def test_reads_python2_packs(tmp_path: Path) -> None:
    images = [encode_image(seed) for seed in range(4)]
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(python2_pack(images, [False, True]))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())  # why the default str decoding cannot be used
    pack = read_bin(path)
    assert pack.issame.tolist() == [False, True]
    assert torch.equal(pack.images[3], decoded(images[3]))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("as_array", [True, False])
def test_reads_numpy_issame(tmp_path: Path, protocol: int, as_array: bool) -> None:
    flags = np.array([True, False, False])
    issame = flags if as_array else list(flags)  # an array, or a list of numpy bool scalars
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps(([encode_image(seed) for seed in range(6)], issame), protocol=protocol))
    assert read_bin(path).issame.tolist() == [True, False, False]


class _RunsShellCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(([_RunsShellCommand(f"touch {sentinel}")], [True]), protocol=4)
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)

    with pytest.raises(VerificationPackError, match=rf"{path}: .*refused global (posix|nt|os)\.system"):
        read_bin(path)
    assert not sentinel.exists()

    pickle.loads(payload)  # control: a plain unpickler does run it
    assert sentinel.exists()


@pytest.mark.parametrize(
    ("module", "name"), [("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load"), ("torch", "load")]
)
def test_only_whitelisted_globals_resolve(tmp_path: Path, module: str, name: str) -> None:
    path = tmp_path / "global.bin"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b".")
    with pytest.raises(VerificationPackError, match=rf"refused global {module}\.{name}"):
        read_bin(path)


def test_codecs_encode_is_limited_to_latin1(tmp_path: Path) -> None:
    path = tmp_path / "codec.bin"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(VerificationPackError, match=r"refused _codecs.encode with encoding 'rot13'"):
        read_bin(path)


def _write_pickle(path: Path, content: object) -> Path:
    path.write_bytes(pickle.dumps(content, protocol=4))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"images": []}, r"expected a pickled \(images, issame\) pair, got dict"),
        (([b""], [True], [1]), r"expected a pickled \(images, issame\) pair, got tuple"),
        (([encode_image(seed) for seed in range(3)], [True]), r"1 pairs need 2 images, got 3"),
        ((b"not a list", [True]), r"1 pairs need 2 images, got bytes"),
        (([encode_image(0), encode_image(1)], [1]), r"issame\[0\] is int, expected bool"),
        (([encode_image(0), encode_image(1)], "yes"), r"issame must be a list of bools, got str"),
        (([encode_image(0), encode_image(1)], np.array([1])), r"issame must be a 1-d bool array, got int64"),
        (
            ([encode_image(0), encode_image(1), "text", encode_image(3)], [True, False]),
            r"image 2 is str, expected encoded bytes",
        ),
        (([encode_image(0), b"\xff\xd8 not a jpeg"], [True]), r"image 1 cannot be decoded"),
    ],
)
def test_bad_structure_names_file_and_index(tmp_path: Path, content: object, message: str) -> None:
    path = _write_pickle(tmp_path / "bad.bin", content)
    with pytest.raises(VerificationPackError, match=rf"^{path}: {message}"):
        read_bin(path)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    write_bin(path, [encode_image(0), encode_image(1)], [True])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(VerificationPackError, match=rf"^{path}: not a readable verification pack"):
        read_bin(path)


def test_write_bin_checks_pair_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 pairs need 4 images, got 3"):
        write_bin(tmp_path / "x.bin", [b"a", b"b", b"c"], [True, False])
    assert list(tmp_path.iterdir()) == []


def test_images_of_other_sizes_are_resized_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    write_bin(path, [encode_image(0, size=(128, 96)), encode_image(1)], [False])
    with pytest.warns(UserWarning, match=r"resized 1 of 2 images to 112x112"):
        pack = read_bin(path)
    assert pack.images.shape == (2, 3, 112, 112)
    with pytest.warns(UserWarning, match=r"resized 2 of 2 images to 128x128"):
        assert read_bin(path, image_size=128).images.shape == (2, 3, 128, 128)


def test_no_warning_when_sizes_match(tmp_path: Path) -> None:
    path = tmp_path / "ok.bin"
    write_bin(path, [encode_image(0), encode_image(1)], [True])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_bin(path)


# ------------------------------------------------------------ the protocol


def brute_force_protocol(embeddings: np.ndarray, issame: list[bool], n_folds: int) -> tuple[float, float, float]:
    """insightface's evaluate() by direct loops in float64: (mean accuracy, std, mean threshold)."""
    rows = [[float(v) for v in row] for row in embeddings]
    unit = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in rows]
    dist = [sum((a - b) ** 2 for a, b in zip(unit[2 * i], unit[2 * i + 1])) for i in range(len(issame))]
    thresholds = [i * 0.01 for i in range(400)]
    n = len(issame)
    fold_sizes = [n // n_folds + (1 if f < n % n_folds else 0) for f in range(n_folds)]
    accuracies, chosen = [], []
    start = 0
    for size in fold_sizes:
        test = list(range(start, start + size))
        train = [i for i in range(n) if i < start or i >= start + size]
        start += size
        best_threshold, best_correct = None, -1
        for threshold in thresholds:
            correct = sum((dist[i] < threshold) == issame[i] for i in train)
            if correct > best_correct:
                best_threshold, best_correct = threshold, correct
        accuracies.append(sum((dist[i] < best_threshold) == issame[i] for i in test) / len(test))
        chosen.append(best_threshold)
    mean = sum(accuracies) / n_folds
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / n_folds)
    return mean, std, sum(chosen) / n_folds


def noisy_pairs(n_pairs: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    first = rng.normal(size=(n_pairs, dim))
    second = np.where(issame[:, None], first, rng.normal(size=(n_pairs, dim))) + noise * rng.normal(size=(n_pairs, dim))
    embeddings = np.empty((2 * n_pairs, dim))
    embeddings[0::2], embeddings[1::2] = first * rng.uniform(0.5, 3, (n_pairs, 1)), second
    return embeddings, issame


@pytest.mark.parametrize(("n_pairs", "n_folds", "seed"), [(57, 10, 0), (40, 10, 1), (33, 5, 2)])
def test_accuracy_matches_brute_force_reference(n_pairs: int, n_folds: int, seed: int) -> None:
    embeddings, issame = noisy_pairs(n_pairs, dim=8, noise=0.9, seed=seed)
    result = verification_accuracy(embeddings, issame, n_folds=n_folds)
    accuracy, std, threshold = brute_force_protocol(embeddings, issame.tolist(), n_folds)
    assert 0.6 < accuracy < 1.0  # neither trivial nor hopeless
    assert result.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert result.std == pytest.approx(std, abs=1e-12)
    assert result.threshold == pytest.approx(threshold, abs=1e-12)


def test_kfold_splits_match_scikit_learn_layout() -> None:
    splits = kfold_splits(23, 10)
    assert [test.tolist() for _, test in splits][:4] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert [len(test) for _, test in splits] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    for train, test in splits:
        assert sorted(train.tolist() + test.tolist()) == list(range(23))
    with pytest.raises(ValueError, match="n_folds=10 for 5 pairs"):
        kfold_splits(5, 10)


def test_thresholds_are_insightface_grid() -> None:
    assert len(THRESHOLDS) == 400 and THRESHOLDS[0] == 0 and THRESHOLDS[-1] == pytest.approx(3.99)


def test_separable_embeddings_score_one() -> None:
    rng = np.random.default_rng(0)
    issame = np.arange(200) % 2 == 0
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    embeddings = np.empty((400, 64))
    embeddings[0::2] = basis[np.arange(200) % 32]
    embeddings[1::2] = np.where(issame[:, None], basis[np.arange(200) % 32], basis[32 + np.arange(200) % 32])
    result = verification_accuracy(embeddings, issame)
    assert result.accuracy == 1.0 and result.std == 0.0
    assert 0 < result.threshold <= 2.0


def test_random_embeddings_score_chance() -> None:
    rng = np.random.default_rng(1)
    result = verification_accuracy(rng.normal(size=(4000, 64)), rng.random(2000) < 0.5)
    assert 0.44 < result.accuracy < 0.56


def test_views_are_summed_and_xnorm_averages_view_norms() -> None:
    embeddings, issame = noisy_pairs(50, dim=8, noise=0.5, seed=3)
    mirrored = embeddings + 0.1 * np.random.default_rng(4).normal(size=embeddings.shape)
    views = np.stack([embeddings, mirrored])
    result = verification_accuracy(views, issame)
    summed = verification_accuracy(torch.from_numpy(embeddings + mirrored), issame)
    assert (result.accuracy, result.std, result.threshold) == (summed.accuracy, summed.std, summed.threshold)
    expected_xnorm = np.mean(np.concatenate([np.linalg.norm(embeddings, axis=1), np.linalg.norm(mirrored, axis=1)]))
    assert result.xnorm == pytest.approx(expected_xnorm)


def test_mismatched_embeddings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"do not match 3 pairs"):
        verification_accuracy(np.ones((5, 4)), np.array([True, False, True]))


# ----------------------------------------------------------- embedding


class _PixelSum(nn.Module):
    """Deterministic 'embedding' whose value depends on the mirror: column sums weighted by position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.arange(x.shape[-1], dtype=x.dtype)
        return torch.stack([x.mean(dim=(1, 2, 3)), (x.mean(dim=(1, 2)) * weights).sum(-1)], dim=1)


def test_embed_images_normalises_flips_and_restores_mode() -> None:
    images = torch.randint(0, 256, (5, 3, 112, 112), dtype=torch.uint8)
    model = _PixelSum().train()
    embed = TorchEmbedder(model, "cpu")
    flipped = embed_images(embed, images, batch_size=2, flip=True)
    plain = embed_images(embed, images, batch_size=3, flip=False)
    assert model.training
    x = (images.float() - 127.5) / 127.5
    torch.testing.assert_close(plain, model(x))
    torch.testing.assert_close(flipped, model(x) + model(x.flip(3)))
    assert embed_views(embed, images, batch_size=4).shape == (2, 5, 2)


def test_embed_images_runs_the_model_in_eval_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 112 * 112, 4), nn.Dropout(0.9)).train()
    images = torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8)
    embed = TorchEmbedder(model, "cpu")
    first = embed_images(embed, images, batch_size=2)
    assert torch.equal(first, embed_images(embed, images, batch_size=2))
    assert model.training and not first.requires_grad


def test_embed_images_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="expected uint8 images"):
        embed_images(TorchEmbedder(_PixelSum()), torch.zeros(2, 3, 112, 112), batch_size=2)


def test_evaluate_pack_end_to_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "tiny.bin"
    issame = [i % 2 == 0 for i in range(20)]
    seeds = [(pair, pair if issame[pair] else 100 + pair) for pair in range(20)]
    images = [encode_image(seed) for pair_seeds in seeds for seed in pair_seeds]
    write_bin(path, images, issame)
    pack = read_bin(path)
    model = build_backbone("tiny", embedding_size=32)
    result = evaluate_pack(model, pack, batch_size=16, device="cpu")
    assert result.accuracy == 1.0  # identical images are at distance 0
    views = embed_views(TorchEmbedder(model), pack.images, 16)
    assert result.xnorm == pytest.approx(views.norm(dim=2).mean().item(), rel=1e-6)
    assert isinstance(pack, VerificationPack)


# ------------------------------------------------------------- ROC, TAR@FAR


def brute_force_tar_at_far(scores: list[float], same: list[bool], far: float) -> tuple[float, float]:
    """Highest TAR over every threshold (accept ``score >= t``) whose FAR <= ``far``, and that threshold."""
    genuine = [s for s, g in zip(scores, same) if g]
    impostor = [s for s, g in zip(scores, same) if not g]
    best_tar, best_threshold = 0.0, math.inf
    for threshold in sorted(set(scores), reverse=True):
        false_accept = sum(s >= threshold for s in impostor) / len(impostor)
        true_accept = sum(s >= threshold for s in genuine) / len(genuine)
        if false_accept <= far and true_accept > best_tar:
            best_tar, best_threshold = true_accept, threshold
    return best_tar, best_threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    same = rng.random(400) < 0.3
    scores = np.round(rng.normal(size=400) + 1.5 * same, 1)  # rounding makes many ties, across labels too
    curve = roc_curve(scores, same)
    assert curve.num_genuine == same.sum() and curve.num_impostor == (~same).sum()
    for point in operating_points(curve, (0.0, 1e-3, 0.01, 0.05, 0.2, 1.0)):
        tar, threshold = brute_force_tar_at_far(scores.tolist(), same.tolist(), point.far_target)
        assert point.tar == pytest.approx(tar, abs=1e-12)
        if tar > 0:
            assert point.threshold == threshold
            assert point.far <= point.far_target


def test_roc_rejects_one_sided_and_non_finite_input() -> None:
    with pytest.raises(ValueError, match="genuine and impostor pairs, got 3 and 0"):
        roc_curve(np.ones(3), np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="1 of 2 scores are not finite"):
        roc_curve(np.array([0.5, np.nan]), np.array([True, False]))


def test_verification_result_reports_tar_on_pair_cosines() -> None:
    embeddings, issame = noisy_pairs(300, dim=8, noise=0.8, seed=5)
    result = verification_accuracy(embeddings, issame)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosines = (unit[0::2] * unit[1::2]).sum(axis=1)
    assert set(result.tar_at_far) == set(VERIFICATION_FARS) and result.num_pairs == 300
    for far, tar in result.tar_at_far.items():
        assert tar == pytest.approx(brute_force_tar_at_far(cosines.tolist(), issame.tolist(), far)[0])
    assert result.cosine_threshold == pytest.approx(1 - result.threshold / 2)
    assert result.to_dict()["tar_at_far"].keys() == {"1e-03", "1e-04"}


def test_shards_of_a_pack_concatenate_to_the_whole(tmp_path: Path) -> None:
    path = tmp_path / "lfw.bin"
    write_bin(path, [encode_image(seed) for seed in range(10)], [True, False, True, False, True])
    whole = read_bin(path)
    shards = [read_bin(path, shard=(rank, 3)) for rank in range(3)]
    assert [len(s.images) for s in shards] == [4, 3, 3] and [s.first_image for s in shards] == [0, 4, 7]
    assert torch.equal(torch.cat([s.images for s in shards]), whole.images)
    assert whole.is_complete and not shards[1].is_complete
    with pytest.raises(ValueError, match="holds 3 of its 10 images"):
        evaluate_pack(_PixelSum(), shards[1], batch_size=4, device="cpu")


# ------------------------------------------------------- training-time monitor


def _pack_of_synthetic_faces(path: Path, num_pairs: int) -> None:
    faces = SyntheticFaces(num_identities=1, seed=3)
    images, issame = faces.render_pairs(range(20), num_pairs, seed=0)
    write_bin(path, [encode_jpeg(image) for image in images], issame)


def _monitor_worker(rank: int, world_size: int, bins: list[str], best_root: str) -> dict[str, object]:
    """Both evaluation modes on this rank: scores, improvements, bests read back by a restarted monitor, log."""
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=16)
    model.features.running_mean.normal_()  # BatchNorm statistics that the ranks must agree on
    if rank == 1:
        model.features.running_mean.add_(1.0)  # each rank's last training forward moved its own copy
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    config = {"model": {"backbone": "tiny", "embedding_size": 16}}
    outcome = {}
    for mode, shared in (("shared", True), ("rank0", False)):  # shared first: rank 1's statistics still differ
        lines: list[str] = []
        best_dir = f"{best_root}/{mode}"
        options = {"batch_size": 7, "shared": shared, "best_dir": best_dir, "run_config": config}
        monitor = VerificationMonitor(bins, env, **options, log=lines.append)
        first = monitor.run(model, step=10)
        second = monitor.run(model, step=20)
        restarted = VerificationMonitor(bins, env, **options)
        outcome[mode] = {
            "results": {name: [r.accuracy, r.std, r.xnorm, r.threshold] for name, r in first.results.items()},
            "improved": [first.improved, second.improved],
            "best": {name: [b.accuracy, b.step] for name, b in restarted.best.items()},
            "lines": lines,
        }
    return outcome


def test_monitor_on_two_ranks_matches_one_process(tmp_path: Path) -> None:
    bins = [tmp_path / "a.bin", tmp_path / "b.bin"]
    _pack_of_synthetic_faces(bins[0], 20)
    _pack_of_synthetic_faces(bins[1], 12)
    per_rank = run_ranks(_monitor_worker, 2, [str(b) for b in bins], str(tmp_path / "best"))

    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=16)
    model.features.running_mean.normal_()
    for mode, log_line in (("shared", "shared by 2 ranks"), ("rank0", "on rank 0")):
        for path in bins:
            pack = read_bin(path)
            reference = verification_accuracy(embed_views(TorchEmbedder(model), pack.images, 64), pack.issame)
            for rank in per_rank:
                accuracy, std, xnorm, threshold = rank[mode]["results"][pack.name]
                assert (accuracy, std, threshold) == (reference.accuracy, reference.std, reference.threshold)
                assert xnorm == pytest.approx(reference.xnorm, rel=1e-5)
                assert rank[mode]["improved"] == [["a", "b"], []]  # the same model does not beat itself
                assert rank[mode]["best"][pack.name] == [reference.accuracy, 10]  # read back from best_dir
            reloaded = load_backbone(tmp_path / "best" / mode / pack.name)
            assert reloaded.step == 10 and reloaded.backbone == "tiny"
            torch.testing.assert_close(reloaded.model.features.running_mean, model.features.running_mean)
        lines = per_rank[0][mode]["lines"]
        assert any(log_line in line for line in lines) and per_rank[1][mode]["lines"] == []
        assert any(line.startswith("[eval step 10] a: accuracy") for line in lines)


def test_monitor_logs_to_tensorboard_and_refuses_duplicate_names(tmp_path: Path) -> None:
    path = tmp_path / "lfw.bin"
    _pack_of_synthetic_faces(path, 10)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="share the name"):
        VerificationMonitor([str(path), str(path)], env)

    class Recorder:
        def __init__(self) -> None:
            self.scalars: dict[str, tuple[float, int]] = {}

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars[tag] = (value, step)

    writer = Recorder()
    monitor = VerificationMonitor([str(path)], env, writer=writer, log=lambda line: None)  # type: ignore[arg-type]
    report = monitor.run(build_backbone("tiny", embedding_size=8), step=5)
    assert writer.scalars["eval/lfw/accuracy"] == (report.results["lfw"].accuracy, 5)
    assert {"eval/lfw/tar_at_far_1e-03", "eval/lfw/best_accuracy", "eval/seconds"} <= set(writer.scalars)
