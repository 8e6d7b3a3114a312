"""A checkpoint of the first format, written by the trainer before its components owned their state
(tests/golden/checkpoint_format_1: two ranks, two steps), loads into today's components and trains on exactly
as that trainer did on one rank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sface_dist.checkpoint import load_trainer_state
from sface_dist.config import load_config
from sface_dist.parallel.launch import DistEnv
from sface_dist.training.trainer import Trainer

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "checkpoint_format_1"
STEP = GOLDEN / "checkpoints" / "step-00000002"
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def norm(tensors: list[torch.Tensor]) -> float:
    return torch.cat([t.double().flatten() for t in tensors]).norm().item()


def test_the_first_format_resumes_into_todays_components(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = json.loads((GOLDEN / "expected.json").read_text())["after_resume"]
    saved = torch.load(STEP / "trainer.pt", weights_only=True)
    head_files = sorted(STEP.glob("head-*.pt"))
    assert len(head_files) == 2  # written by two ranks, resumed by one
    shards = [torch.load(path, weights_only=True) for path in head_files]
    run = tmp_path / "run"
    shutil.copytree(GOLDEN / "checkpoints", run / "checkpoints")
    cfg = load_config(GOLDEN / "config.yaml", ["train.steps=3", f"train.output={run}"])
    trainer = Trainer(cfg, ENV)
    try:
        for name, tensor in saved["backbone"].items():
            assert torch.equal(trainer.backbone.state_dict()[name], tensor), name
        optimizer = trainer.optimization.backbone_optimizer.state_dict()["state"]
        for index, entry in saved["backbone_optimizer"]["state"].items():
            assert torch.equal(optimizer[index]["momentum_buffer"], entry["momentum_buffer"]), index
        rows = torch.cat([shard["head"]["rows"]["weight"] for shard in shards])
        momentum = torch.cat([shard["optimizer"]["rows"]["momentum_buffer"] for shard in shards])
        assert torch.equal(trainer.head.weight.detach(), rows)
        assert torch.equal(trainer.optimization.head_optimizer.state_dict()["rows"]["momentum_buffer"], momentum)
        assert trainer.progress.state_dict() == {"step": saved["step"], "progress": saved["progress"]}
        assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
        trainer.fit()
    finally:
        trainer.close()
    out = capsys.readouterr().out
    for step, loss in zip((3, 4), expected["losses"], strict=True):
        assert f"step {step}/4 loss {loss:.4f} " in out, out
    after = load_trainer_state(run / "checkpoints" / "step-00000004")
    head = torch.load(next((run / "checkpoints" / "step-00000004").glob("head-*.pt")), weights_only=True)
    assert after["step"] == expected["step"] and after["progress"] == expected["progress"]
    momenta = [entry["momentum_buffer"] for entry in after["backbone_optimizer"]["state"].values()]
    measured = {
        "backbone_norm": norm([t for t in after["backbone"].values() if t.is_floating_point()]),
        "backbone_momentum_norm": norm(momenta),
        "head_norm": norm([head["head"]["rows"]["weight"]]),
        "head_momentum_norm": norm([head["optimizer"]["rows"]["momentum_buffer"]]),
    }
    for name, value in measured.items():
        assert value == pytest.approx(expected[name], rel=1e-4), name
