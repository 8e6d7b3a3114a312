"""The training-time verification monitor: shared across ranks, best backbones kept, TensorBoard scalars."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from sface_dist.backbones import build_backbone
from sface_dist.data.bin_pack import read_bin, write_bin
from sface_dist.data.images import encode_jpeg
from sface_dist.data.synthetic import SyntheticFaces
from sface_dist.evaluation.checkpoint_backbone import load_backbone
from sface_dist.evaluation.embedder import TorchEmbedder, embed_views
from sface_dist.evaluation.monitor import VerificationMonitor
from sface_dist.evaluation.verification import verification_accuracy
from sface_dist.parallel.launch import DistEnv

from rank_launcher import run_ranks


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
        best_dir = f"{best_root}/{mode}"
        options = {"batch_size": 7, "shared": shared, "best_dir": best_dir, "run_config": config}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            monitor = VerificationMonitor(bins, env, **options)
            first = monitor.run(model, step=10)
            second = monitor.run(model, step=20)
        lines = printed.getvalue().splitlines()
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
    monitor = VerificationMonitor([str(path)], env, writer=writer)  # type: ignore[arg-type]
    report = monitor.run(build_backbone("tiny", embedding_size=8), step=5)
    assert writer.scalars["eval/lfw/accuracy"] == (report.results["lfw"].accuracy, 5)
    assert {"eval/lfw/tar_at_far_1e-03", "eval/lfw/best_accuracy", "eval/seconds"} <= set(writer.scalars)
