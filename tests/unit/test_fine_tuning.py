"""``train.init_backbone`` and ``train.freeze_backbone_steps``: a new run starts from given backbone weights with a
fresh head, and the first steps train the head alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from insightface_weights import filled

from sface_dist.backbones import build_backbone
from sface_dist.config import ModelConfig
from sface_dist.training.trainer import Trainer

from synthetic_trainer import ENV, make_config


def trained(output: Path, **train: object) -> Trainer:
    trainer = Trainer(make_config(output, **train), ENV)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def test_a_new_run_starts_from_a_checkpoints_backbone_with_a_fresh_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pretrained = trained(tmp_path / "pretrain", steps=4)
    weights = {name: tensor.clone() for name, tensor in pretrained.backbone.state_dict().items()}
    scratch = Trainer(make_config(tmp_path / "scratch", steps=4), ENV)
    scratch.close()
    tuned = Trainer(make_config(tmp_path / "tuned", steps=4, init_backbone=str(tmp_path / "pretrain")), ENV)
    try:
        for name, tensor in tuned.backbone.state_dict().items():
            assert torch.equal(tensor, weights[name]), name
        assert torch.equal(tuned.head.weight, scratch.head.weight)  # the head a new run of this seed starts with
        assert not torch.equal(tuned.head.weight, pretrained.head.weight)
    finally:
        tuned.close()
    assert f"backbone from tiny (16-d) from {tmp_path / 'pretrain' / 'checkpoints' / 'step-00000004'}, step 4; " \
           "a fresh head" in capsys.readouterr().out


def test_a_backbone_of_another_shape_is_one_line(tmp_path: Path) -> None:
    trained(tmp_path / "pretrain", steps=2)
    cfg = make_config(tmp_path / "tuned", init_backbone=str(tmp_path / "pretrain"))
    cfg = dataclasses.replace(cfg, model=ModelConfig(backbone="tiny", embedding_size=32))
    with pytest.raises(ValueError) as raised:
        Trainer(cfg, ENV)
    assert str(raised.value) == (f"train.init_backbone {tmp_path / 'pretrain'}: holds a tiny (16-d); the config "
                                 "trains a tiny (32-d) (model.backbone, model.embedding_size)")


def test_frozen_steps_train_the_head_alone(tmp_path: Path) -> None:
    trainer = Trainer(make_config(tmp_path / "run", steps=3, freeze_backbone_steps=2), ENV)
    snapshots = []
    train_step = trainer.train_step

    def recorded(batches: list) -> object:
        metrics = train_step(batches)
        snapshots.append(([p.detach().clone() for p in trainer.backbone.parameters()],
                          trainer.head.weight.detach().clone()))
        return metrics

    start = ([p.detach().clone() for p in trainer.backbone.parameters()], trainer.head.weight.detach().clone())
    trainer.train_step = recorded  # type: ignore[method-assign]
    try:
        trainer.fit()
    finally:
        trainer.close()
    previous = start
    for step, (backbone, head) in enumerate(snapshots, start=1):
        same_backbone = all(torch.equal(a, b) for a, b in zip(backbone, previous[0], strict=True))
        assert same_backbone == (step <= 2), step
        assert not torch.equal(head, previous[1]), step
        previous = (backbone, head)


def test_a_resume_takes_its_checkpoints_weights_not_the_initial_ones(tmp_path: Path) -> None:
    trained(tmp_path / "pretrain", steps=2)
    first = trained(tmp_path / "tuned", steps=2, init_backbone=str(tmp_path / "pretrain"))
    after_two = {name: tensor.clone() for name, tensor in first.backbone.state_dict().items()}
    resumed = Trainer(make_config(tmp_path / "tuned", steps=4, init_backbone=str(tmp_path / "pretrain")), ENV)
    try:
        for name, tensor in resumed.backbone.state_dict().items():
            assert torch.equal(tensor, after_two[name]), name
    finally:
        resumed.close()


def test_insightface_weights_start_a_run_as_they_are(tmp_path: Path) -> None:
    """arcface_torch's model.pt of an r18 (the golden weights of tests/golden/insightface) as init_backbone."""
    weights = filled(build_backbone("iresnet18", 16).state_dict())
    torch.save(weights, tmp_path / "model.pt")
    cfg = make_config(tmp_path / "run", init_backbone=str(tmp_path / "model.pt"))
    trainer = Trainer(dataclasses.replace(cfg, model=ModelConfig(backbone="iresnet18", embedding_size=16)), ENV)
    try:
        for name, tensor in trainer.backbone.state_dict().items():
            assert torch.equal(tensor, weights[name]), name
    finally:
        trainer.close()
