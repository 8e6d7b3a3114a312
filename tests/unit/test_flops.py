"""Parameters and multiply-accumulates (``backbones.complexity``, ``tools/flops.py``) against counts by hand."""

from __future__ import annotations

import pytest
import torch

from sface_dist.backbones.complexity import count_macs, measure
from sface_dist.backbones.iresnet import IBasicBlock, _make_stage

from training_runs import tool


def test_one_residual_block_by_hand() -> None:
    """IBasicBlock(64 -> 64) at 28x28: two 3x3 convolutions of 64 x 64 channels at every output pixel."""
    with torch.device("meta"):
        block = IBasicBlock(64, 64)
    assert count_macs(block, torch.empty(1, 64, 28, 28, device="meta")) == 2 * (64 * 64 * 3 * 3) * 28 * 28
    params = 2 * 64 * 64 * 9 + 3 * 2 * 64 + 64  # two convolutions, three batch norms (weight, bias), one PReLU
    assert sum(p.numel() for p in block.parameters()) == params


def test_a_strided_stage_by_hand() -> None:
    """The first stage of every iresnet (64 -> 64 channels, 112x112 -> 56x56, two blocks): the first block's
    first convolution runs at the input's 112x112, its second (stride 2) and the 1x1 projection at 56x56, and
    the second block's two at 56x56."""
    with torch.device("meta"):
        stage = _make_stage(64, 64, 2)
    conv = 64 * 64 * 9
    expected = conv * 112 * 112 + conv * 56 * 56 + 64 * 64 * 56 * 56 + 2 * conv * 56 * 56
    assert count_macs(stage, torch.empty(1, 64, 112, 112, device="meta")) == expected


def test_the_table_names_every_backbone_and_matches_the_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert tool("flops").main(["iresnet50", "mobilefacenet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["backbone", "params", "(M)", "GMACs"]
    size = measure("iresnet50")
    assert lines[1].split() == ["iresnet50", f"{size.params / 1e6:.2f}", f"{size.macs / 1e9:.3f}",
                                f"{2 * size.macs / 1e9:.3f}"]
    assert 6.2e9 < size.macs < 6.4e9  # insightface's published 6.3 G for its r50
    with pytest.raises(SystemExit) as raised:
        tool("flops").main(["resnet9000"])
    assert raised.value.code == 2
