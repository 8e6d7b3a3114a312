"""IJB-B/C 1:1: 5-point alignment, meta files, media/template aggregation, resumable extraction, the CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from sface_dist.backbones import build_backbone
from sface_dist.checkpoint import save_backbone
from sface_dist.data.synthetic import SyntheticFaces
from sface_dist.evaluation.alignment import ARCFACE_TEMPLATE, align_face, similarity_transform
from sface_dist.evaluation.checkpoint_backbone import load_backbone
from sface_dist.evaluation.embedder import TorchEmbedder, embed_views
from sface_dist.evaluation.extraction import extract_views
from sface_dist.evaluation.ijb import IjbError, detect_target, read_ijb, score_ijb, template_features
from sface_dist.evaluation.roc import IJB_FARS

from ijb_sets import apply, loose_crop, make_ijb_set, placement, similarity
from roc_reference import brute_force_tar_at_far, insightface_tar_at_far

ROOT = Path(__file__).resolve().parents[2]


def smooth_image(seed: int, size: int = 112) -> np.ndarray:
    """A low-frequency RGB pattern: bilinear resampling of it is accurate to a fraction of a grey level."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [
        127.5 + 60 * np.sin(2 * np.pi * (fx * x + fy * y) + phase) + 50 * np.cos(2 * np.pi * gx * x * y)
        for fx, fy, phase, gx in rng.uniform((0.3, 0.3, 0, 0.2), (1.5, 1.5, 6.28, 1.0), size=(3, 4))
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("seed", range(4))
def test_similarity_transform_inverts_a_known_similarity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    forward = similarity(rng.uniform(0.5, 3), rng.uniform(-170, 170), tuple(rng.uniform(-50, 200, size=2)))
    landmarks = apply(forward, ARCFACE_TEMPLATE)
    recovered = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(recovered, inverse, atol=1e-9)


def test_similarity_transform_is_the_least_squares_fit() -> None:
    rng = np.random.default_rng(7)
    source = ARCFACE_TEMPLATE + rng.normal(scale=3.0, size=(5, 2))
    fitted = similarity_transform(source, ARCFACE_TEMPLATE)

    def residual(matrix: np.ndarray) -> float:
        return float(np.square(apply(matrix, source) - ARCFACE_TEMPLATE).sum())

    reference = cv2.estimateAffinePartial2D(source, ARCFACE_TEMPLATE, method=cv2.LMEDS)[0]
    assert residual(fitted) <= residual(reference) + 1e-9
    for _ in range(200):  # no nearby similarity (4 parameters) fits better
        scale, angle = math.hypot(*fitted[:, 0]), math.atan2(fitted[1, 0], fitted[0, 0])
        d_scale, d_angle, dx, dy = rng.normal(scale=(1e-3, 1e-3, 0.05, 0.05))
        shift = (fitted[0, 2] + dx, fitted[1, 2] + dy)
        nudged = similarity(scale * (1 + d_scale), math.degrees(angle + d_angle), shift)
        assert residual(nudged) >= residual(fitted)
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE)


@pytest.mark.parametrize("seed", range(3))
def test_align_face_recovers_the_crop_and_matches_opencv_align_crop(seed: int, pooling_model: Path) -> None:
    rng = np.random.default_rng(seed)
    aligned = smooth_image(seed)
    forward = placement(rng.uniform(1.2, 2.0), rng.uniform(-30, 30), (170 + rng.uniform(-5, 5), 175))
    loose = loose_crop(aligned, forward, (340, 350), background=0)
    landmarks = apply(forward, ARCFACE_TEMPLATE)

    recovered = align_face(loose, landmarks).astype(np.float64)
    inner = (slice(8, -8), slice(8, -8))
    assert np.abs(recovered[inner] - aligned[inner]).mean() < 0.1

    box = np.zeros((1, 15), dtype=np.float32)  # FaceDetectorYN's row: x, y, w, h, 5 landmarks, score
    box[0, 4:14] = landmarks.ravel()
    recognizer = cv2.FaceRecognizerSF.create(str(pooling_model), "")
    opencv = recognizer.alignCrop(loose, box).astype(np.float64)
    assert np.abs(recovered - opencv).max() <= 1 and np.abs(recovered - opencv).mean() < 1e-3  # float rounding


@pytest.fixture(scope="module")
def pooling_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest ONNX model FaceRecognizerSF accepts (it needs one before alignCrop can run)."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         onnx.helper.make_node("Flatten", ["pooled"], ["embedding"])],
        "pool",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 112, 112])],
        [onnx.helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path_factory.mktemp("onnx") / "pool.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


def test_align_face_rejects_bad_landmarks() -> None:
    with pytest.raises(ValueError, match="need 5 landmarks"):
        align_face(np.zeros((50, 50, 3), np.uint8), np.zeros(8))


# ----------------------------------------------------------- an IJB-style set


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("IJB_release") / "IJBC"
    make_ijb_set(root)
    return root


def test_read_ijb_parses_the_standard_layout(ijb_root: Path) -> None:
    protocol = read_ijb(ijb_root)
    assert protocol.target == "IJBC" == detect_target(ijb_root)
    assert len(protocol.image_names) == 30 and protocol.landmarks.shape == (30, 5, 2)
    assert len(np.unique(protocol.templates)) == 10 and len(np.unique(protocol.medias)) == 20
    assert protocol.template_pairs.shape == (45, 2) and protocol.labels.sum() == 5
    assert ((protocol.faceness >= 0.5) & (protocol.faceness <= 1.0)).all()


def test_loose_crops_align_back_to_the_rendered_faces(ijb_root: Path) -> None:
    protocol = read_ijb(ijb_root)
    faces = SyntheticFaces(5, seed=0)

    def block_means(image: np.ndarray) -> np.ndarray:
        """4x4 block means of the inner 96x96: the renders' pixel noise averages out, the face stays."""
        return image[:, 8:-8, 8:-8].astype(np.float64).reshape(3, 24, 4, 24, 4).mean(axis=(2, 4))

    for index in (0, 7, 29):
        identity = index // 6  # six faces per identity, in order
        aligned = block_means(protocol.load_aligned(index))
        rendered = block_means(faces.render(identity, index + 1).transpose(2, 0, 1))
        other = block_means(faces.render((identity + 1) % 5, index + 1).transpose(2, 0, 1))
        assert np.abs(aligned - rendered).mean() < 2 < 20 < np.abs(aligned - other).mean()


def brute_force_ijb_scores(views: np.ndarray, protocol_dir: Path, flip: bool, faceness: bool, unit: bool) -> np.ndarray:
    """insightface's image2template_feature + verification, transliterated with loops in float64."""
    faces = [line.split() for line in (protocol_dir / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    score_lines = (protocol_dir / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()
    scores = [float(np.float32(line.split()[-1])) for line in score_lines]  # insightface reads them as float32
    features = []
    for index in range(len(faces)):
        feature = views[0, index].astype(np.float64) + (views[1, index] if flip else 0.0)
        if unit:
            feature = feature / np.linalg.norm(feature)
        features.append(feature * (scores[index] if faceness else 1.0))
    by_template: dict[int, dict[int, list[np.ndarray]]] = {}
    for (_, template_id, media_id), feature in zip(faces, features):
        by_template.setdefault(int(template_id), {}).setdefault(int(media_id), []).append(feature)
    template_feature = {}
    for template, medias in by_template.items():
        total = sum(np.mean(media_features, axis=0) for media_features in medias.values())
        template_feature[template] = total / np.linalg.norm(total)
    pairs = [line.split() for line in (protocol_dir / "meta" / "ijbc_template_pair_label.txt").read_text().splitlines()]
    return np.array([float(template_feature[int(a)] @ template_feature[int(b)]) for a, b, _ in pairs])


@pytest.mark.parametrize(("flip", "faceness", "unit"), [(True, True, False), (False, False, True)])
def test_scores_match_insightface_aggregation(ijb_root: Path, flip: bool, faceness: bool, unit: bool) -> None:
    protocol = read_ijb(ijb_root)
    rng = np.random.default_rng(3)
    views = rng.normal(size=(2, len(protocol.image_names), 16)).astype(np.float32)
    views *= rng.uniform(0.2, 5, size=(1, len(protocol.image_names), 1)).astype(np.float32)  # norms matter (N1)
    result = score_ijb(protocol, views, flip=flip, faceness_weighting=faceness, normalize_images=unit)
    expected = brute_force_ijb_scores(views, ijb_root, flip, faceness, unit)
    np.testing.assert_allclose(result.scores, expected, rtol=0, atol=1e-12)
    assert [point.far_target for point in result.points] == list(IJB_FARS)
    labels = result.labels.tolist()
    for point, nearest in zip(result.points, result.nearest_points):
        assert point.tar == brute_force_tar_at_far(result.scores.tolist(), labels, point.far_target)[0]
        assert (nearest.tar, nearest.far, nearest.threshold) == insightface_tar_at_far(
            result.scores.tolist(), labels, nearest.far_target
        )


def test_template_features_are_unit_and_order_independent() -> None:
    rng = np.random.default_rng(0)
    templates, medias = rng.integers(0, 6, 60), rng.integers(0, 4, 60)
    features = rng.normal(size=(60, 8))
    ids, unit = template_features(features, templates, medias)
    shuffle = rng.permutation(60)
    ids_shuffled, unit_shuffled = template_features(features[shuffle], templates[shuffle], medias[shuffle])
    assert ids.tolist() == sorted(set(templates.tolist())) == ids_shuffled.tolist()
    np.testing.assert_allclose(unit, unit_shuffled, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0)


# ----------------------------------------------------------- bad meta files


def _copy_set(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def test_missing_images_are_counted_and_named(ijb_root: Path, tmp_path: Path) -> None:
    root = _copy_set(ijb_root, tmp_path / "IJBC")
    for name in ("12.jpg", "3.jpg", "20.jpg"):
        (root / "loose_crop" / name).unlink()
    message = r"loose_crop: 3 of the 30 images listed in ijbc_name_5pts_score.txt are missing, first: 3.jpg, 12.jpg"
    with pytest.raises(IjbError, match=message + ", 20.jpg$"):
        read_ijb(root)


@pytest.mark.parametrize(
    ("kind", "edit", "message"),
    [
        ("name_5pts_score", lambda lines: lines[:-1], r"lists 29 faces, ijbc_face_tid_mid.txt 30; .* line 30"),
        ("name_5pts_score", lambda lines: [lines[1], lines[0], *lines[2:]], r"differ first at line 1"),
        ("face_tid_mid", lambda lines: [lines[0] + " extra", *lines[1:]], r"ijbc_face_tid_mid.txt:1: expected"),
        ("template_pair_label", lambda lines: [*lines, "101 999 1"], r"1 template ids have no face .*: 999"),
        ("template_pair_label", lambda lines: [*lines, "101 102 2"], r"ijbc_template_pair_label.txt:46: label"),
        ("template_pair_label", lambda lines: [*lines, "101 x 1"], r"ijbc_template_pair_label.txt:46: expected"),
    ],
)
def test_inconsistent_meta_files_are_clear_errors(
    ijb_root: Path, tmp_path: Path, kind: str, edit: Callable[[list[str]], list[str]], message: str
) -> None:
    root = _copy_set(ijb_root, tmp_path / "IJBC")
    path = root / "meta" / f"ijbc_{kind}.txt"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(IjbError, match=message):
        read_ijb(root)


def test_target_must_be_found(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    with pytest.raises(IjbError, match=r"no IJB meta files \(expected .*ijbb_face_tid_mid.txt or"):
        read_ijb(tmp_path)
    with pytest.raises(IjbError, match=r"ijbb_face_tid_mid.txt: IJB meta file not found"):
        read_ijb(tmp_path, "IJBB")


# ------------------------------------------------------- resumable extraction


class _Interrupted(Exception):
    pass


def test_extraction_resumes_from_cached_chunks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, 3, 112, 112), dtype=np.uint8)
    embed = TorchEmbedder(build_backbone("tiny", 8).eval())
    loads: list[int] = []
    interrupt = {"at": 14}

    def load(index: int) -> np.ndarray:
        if index == interrupt["at"]:
            raise _Interrupted
        loads.append(index)
        return images[index]

    cache = tmp_path / "cache"
    with pytest.raises(_Interrupted):
        extract_views(embed, load, 23, batch_size=4, chunk_size=5, cache_dir=cache, workers=1, progress=None)
    assert sorted(p.name for p in cache.glob("views-*.npy")) == ["views-000000000.npy", "views-000000005.npy"]
    loads.clear()
    interrupt["at"] = -1
    views = extract_views(embed, load, 23, batch_size=4, chunk_size=5, cache_dir=cache, workers=2, progress=None)
    assert sorted(loads) == list(range(10, 23))  # chunks 0 and 5 came from the cache
    expected = embed_views(embed, torch.from_numpy(images), batch_size=23).numpy()
    np.testing.assert_allclose(views, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"cache: embedding cache made for .*'chunk_size': 5.*delete the folder"):
        extract_views(embed, load, 23, batch_size=4, chunk_size=6, cache_dir=cache, progress=None)


# ---------------------------------------------------------------------- CLI


def test_eval_ijb_tool_end_to_end(ijb_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone("tiny", 16).eval()
    config = {"model": {"backbone": "tiny", "embedding_size": 16}}
    checkpoint = save_backbone(tmp_path / "best", model, {"step": 7, "config": config})
    out = tmp_path / "results"
    command = [sys.executable, "tools/eval_ijb.py", "--checkpoint", str(checkpoint), "--root", str(ijb_root)]
    command += ["--out", str(out), "--batch-size", "8", "--device", "cpu", "--name", "tiny"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "IJBC: 30 faces, 45 template pairs" in first.stdout
    assert "| tiny TAR (%), FAR <= target |" in first.stdout and "5 genuine and 40 impostor pairs" in first.stdout
    assert "| tiny TAR (%), nearest ROC point (insightface's tables) |" in first.stdout

    scores = np.load(out / "ijbc_scores.npy")
    (cache,) = (out / "cache").iterdir()
    views = np.concatenate([np.load(p) for p in sorted(cache.glob("views-*.npy"))], axis=1)
    np.testing.assert_allclose(scores, brute_force_ijb_scores(views, ijb_root, True, True, False), atol=1e-12)

    protocol = read_ijb(ijb_root)
    aligned = torch.from_numpy(np.stack([protocol.load_aligned(i) for i in range(30)]))
    direct = embed_views(TorchEmbedder(load_backbone(checkpoint).model), aligned, batch_size=30).numpy()
    np.testing.assert_allclose(views, direct, rtol=1e-4, atol=1e-5)

    summary = json.loads((out / "ijbc_tar_at_far.json").read_text())
    assert [p["far_target"] for p in summary["tar_at_far"]] == list(IJB_FARS)
    nearest = [insightface_tar_at_far(scores.tolist(), protocol.labels.tolist(), far) for far in IJB_FARS]
    assert [(p["tar"], p["far"], p["threshold"]) for p in summary["tar_at_far_nearest"]] == nearest
    assert summary["readings"].keys() == {"tar_at_far", "tar_at_far_nearest"}
    assert summary["pairs"] == {"genuine": 5, "impostor": 40}
    assert (out / "ijbc_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run(command + ["--no-faceness"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "faceness_weighting off" in again.stdout
    without_faceness = brute_force_ijb_scores(views, ijb_root, flip=True, faceness=False, unit=False)
    np.testing.assert_allclose(np.load(out / "ijbc_scores.npy"), without_faceness, atol=1e-12)


def test_eval_ijb_tool_reports_missing_images(ijb_root: Path, tmp_path: Path) -> None:
    root = _copy_set(ijb_root, tmp_path / "IJBC")
    (root / "loose_crop" / "5.jpg").unlink()
    command = [sys.executable, "tools/eval_ijb.py", "--onnx", "missing.onnx", "--root", str(root)]
    command += ["--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {root / 'loose_crop'}: 1 of the 30 images listed in ijbc_name_5pts_score.txt are missing, first: 5.jpg"
    )
