"""``tools/from_arcface_config.py``: an arcface_torch config file (written here in its format: ``config.KEY =``
lines over its base.py) becomes a config the project loads, each key where arcface_torch's code uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sface_dist.config import load_config

from training_runs import tool

MS1MV3_R50 = '''from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]
config.lr = 0.1 * 2
config.using_wandb = False
'''


def convert(tmp_path: Path, text: str, *options: str) -> tuple[int, Path]:
    source = tmp_path / "job.py"
    source.write_text(text)
    out = tmp_path / "job.yaml"
    return tool("from_arcface_config").main([str(source), "--out", str(out), *options]), out


def test_a_recipe_maps_where_arcface_torch_uses_each_key(tmp_path: Path) -> None:
    status, out = convert(tmp_path, MS1MV3_R50, "--world-size", "4")
    assert status == 0
    cfg = load_config(out)
    assert (cfg.model.backbone, cfg.model.embedding_size) == ("iresnet50", 512)
    assert (cfg.head.type, cfg.head.s, cfg.head.sample_rate) == ("arcface", 64.0, 0.3)
    assert (cfg.data.root, cfg.data.num_classes, cfg.data.batch_size) == ("/train_tmp/ms1m-retinaface-t1", 93431, 128)
    assert cfg.eval.bins == [f"/train_tmp/ms1m-retinaface-t1/{name}.bin" for name in ("lfw", "cfp_fp", "agedb_30")]
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert cfg.optim.warmup_steps == 2 * (5179510 // (128 * 4))  # arcface_torch: num_image // total batch * epochs
    assert (cfg.train.epochs, cfg.train.amp, cfg.train.seed, cfg.train.log_every) == (20, "fp16", 2048, 10)
    assert (cfg.eval.every, cfg.train.output, cfg.train.resume) == (2000, "runs/job", False)
    comments = [line for line in out.read_text().splitlines() if line.startswith("# ")]
    assert "# lr = 0.1 * 2: not a literal, not read" in comments
    assert "# using_wandb = False: not mapped: no counterpart in the project" in comments
    assert "# num_image = 5179510: not mapped: the project counts the images in the dataset's index" in comments


@pytest.mark.parametrize(("margins", "head"), [
    ((1.0, 0.0, 0.4), ("cosface", [1.0, 0.0, 0.4])),
    ((1.0, 0.3, 0.2), ("cosface", [1.0, 0.0, 0.2])),
    ((0.9, 0.4, 0.0), ("combined", [0.9, 0.4, 0.0])),
])
def test_margins_follow_arcface_torchs_combined_margin_loss(tmp_path: Path, margins: tuple, head: tuple) -> None:
    """arcface_torch's CombinedMarginLoss takes the CosFace branch whenever m3 > 0, whatever m1 and m2 say."""
    status, out = convert(tmp_path, f"config.margin_list = {margins}\nconfig.network = 'mbf'\nconfig.rec = 'data'\n")
    assert status == 0
    cfg = load_config(out)
    assert (cfg.head.type, cfg.head.margin, cfg.model.backbone) == (*head, "mobilefacenet")


def test_an_unknown_network_and_a_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = convert(tmp_path, "config.network = 'r2060'\nconfig.rec = 'data'\n")
    assert status == 0 and load_config(out).model.backbone == "iresnet50"
    assert "# network = 'r2060': no counterpart among r18, r34, r50, r100, r200, mbf" in out.read_text()
    status, _ = convert(tmp_path, "config.lr = (\n")
    assert status == 1 and capsys.readouterr().err.startswith("error: ")
    status, _ = convert(tmp_path, "config.network = 'r18'\n")
    assert status == 1 and capsys.readouterr().err == (
        f"error: {tmp_path / 'job.py'}: no config.rec = '<dataset folder>' (arcface_torch needs one too)\n")
