"""Light backbones: MobileFaceNet (insightface ``mbf``) and ``TinyFaceNet`` for CPU demos and tests.

``MobileFaceNet`` keeps insightface's module tree and parameter names
(``recognition/arcface_torch/backbones/mobilefacenet.py``, ``get_mbf``) so its
checkpoints load. Neither model contains autocast regions or dtype casts.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SIZE = 112


def _check_input(x: torch.Tensor, model: str) -> None:
    if x.dim() != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"{model} expects input [B, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {list(x.shape)}")


class ConvBlock(nn.Module):
    """Conv-BN-PReLU, or Conv-BN with ``activation=False`` (the linear bottleneck projection).

    Both keep insightface's ``layers.{0,1,2}`` parameter names.
    """

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        ]
        if activation:
            layers.append(nn.PReLU(out_c))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``groups`` channels, depthwise 3x3, 1x1 linear projection."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, stride: int = 2, groups: int = 1) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups),
            ConvBlock(groups, groups, kernel=3, stride=stride, padding=1, groups=groups),
            ConvBlock(groups, out_c, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` stride-1 residual ``DepthWise`` blocks at constant width."""

    def __init__(self, channels: int, num_block: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(channels, channels, residual=True, stride=1, groups=groups) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise 7x7 conv, then Linear and BatchNorm1d to the embedding."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(512, 512, kernel=7, groups=512, activation=False),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """insightface ``mbf``: ``blocks`` residual blocks per stage, width multiplier ``scale``."""

    def __init__(
        self, embedding_size: int = 512, blocks: tuple[int, int, int, int] = (1, 4, 6, 2), scale: int = 2
    ) -> None:
        super().__init__()
        width1, width2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, width1, kernel=3, stride=2, padding=1)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(width1, width1, kernel=3, padding=1, groups=64))
        else:
            self.layers.append(Residual(width1, num_block=blocks[0], groups=128))
        self.layers.extend([
            DepthWise(width1, width1, stride=2, groups=128),
            Residual(width1, num_block=blocks[1], groups=128),
            DepthWise(width1, width2, stride=2, groups=256),
            Residual(width2, num_block=blocks[2], groups=256),
            DepthWise(width2, width2, stride=2, groups=512),
            Residual(width2, num_block=blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(width2, 512)
        self.features = GDC(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        """insightface's init: Kaiming-normal (fan_out) for conv and linear, BN2d (1, 0)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, "MobileFaceNet")
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


class TinyFaceNet(nn.Module):
    """A few-stage conv net for CPU demos and tests (not a recognition model).

    The 112x112 input is average-pooled to 56x56, then three stride-2
    Conv-BN-PReLU stages reach 7x7; the map is flattened (keeping the spatial
    layout that tells synthetic identities apart) into Linear + BatchNorm1d,
    the same embedding head as IResNet.
    """

    def __init__(self, embedding_size: int = 512, width: int = 32) -> None:
        super().__init__()
        self.downscale = nn.AvgPool2d(2)
        self.stages = nn.Sequential(
            ConvBlock(3, width, kernel=3, stride=2, padding=1),
            ConvBlock(width, 2 * width, kernel=3, stride=2, padding=1),
            ConvBlock(2 * width, 4 * width, kernel=3, stride=2, padding=1),
        )
        self.fc = nn.Linear(4 * width * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, "TinyFaceNet")
        x = self.stages(self.downscale(x))
        return self.features(self.fc(torch.flatten(x, 1)))
