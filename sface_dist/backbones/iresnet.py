"""Improved ResNet (IResNet) face backbones, parameter-compatible with insightface.

The architecture and parameter names follow insightface's
``recognition/arcface_torch/backbones/iresnet.py`` so that its checkpoints
load with ``load_state_dict``. The forward pass holds no autocast region and
no dtype casts: mixed precision and ``channels_last`` are chosen by the trainer.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SIZE = 112
_FINAL_MAP = 7  # spatial size after the four stride-2 stages: 112 / 16

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN, plus shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return out


def _make_stage(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    """A stride-2 block with a 1x1 projection shortcut, then ``blocks - 1`` identity blocks."""
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False),
        nn.BatchNorm2d(planes, eps=1e-5),
    )
    first = IBasicBlock(inplanes, planes, stride=2, downsample=downsample)
    return nn.Sequential(first, *[IBasicBlock(planes, planes) for _ in range(1, blocks)])


class IResNet(nn.Module):
    """IResNet for aligned 3x112x112 faces; returns un-normalised ``[B, embedding_size]`` embeddings."""

    def __init__(self, layers: tuple[int, int, int, int], embedding_size: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = _make_stage(64, 64, layers[0])
        self.layer2 = _make_stage(64, 128, layers[1])
        self.layer3 = _make_stage(128, 256, layers[2])
        self.layer4 = _make_stage(256, 512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * _FINAL_MAP * _FINAL_MAP, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        """insightface's init: conv N(0, 0.1), BN2d (1, 0); the embedding BN scale is fixed at 1."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"IResNet expects input [B, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {list(x.shape)}")
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))

