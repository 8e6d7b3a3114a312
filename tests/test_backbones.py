"""Backbones: registry, output shapes, insightface checkpoint compatibility."""

from __future__ import annotations

import pytest
import torch

from sface_dist.backbones import BACKBONES, build_backbone

# insightface arcface_torch iresnet50 with num_features=512: sum(p.numel() for p in model.parameters()).
IRESNET50_PARAMETERS = 43_590_848


def _bn(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.weight", (channels,)),
        (f"{prefix}.bias", (channels,)),
        (f"{prefix}.running_mean", (channels,)),
        (f"{prefix}.running_var", (channels,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def insightface_iresnet_state(layers: list[int], num_features: int) -> list[tuple[str, tuple[int, ...]]]:
    """state_dict (key, shape) list of insightface's IResNet, in its module registration order.

    Written from ``recognition/arcface_torch/backbones/iresnet.py``: IBasicBlock registers
    bn1, conv1, bn2, prelu, conv2, bn3, downsample (conv1x1 stride 2 + BN on each stage's
    first block, since every stage has stride 2); the net registers conv1, bn1, prelu,
    layer1..4, bn2, (dropout), fc, features.
    """
    state = [("conv1.weight", (64, 3, 3, 3)), *_bn("bn1", 64), ("prelu.weight", (64,))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            state += _bn(f"{prefix}.bn1", inplanes)
            state += [(f"{prefix}.conv1.weight", (planes, inplanes, 3, 3))]
            state += _bn(f"{prefix}.bn2", planes)
            state += [(f"{prefix}.prelu.weight", (planes,)), (f"{prefix}.conv2.weight", (planes, planes, 3, 3))]
            state += _bn(f"{prefix}.bn3", planes)
            if block == 0:
                state += [(f"{prefix}.downsample.0.weight", (planes, inplanes, 1, 1))]
                state += _bn(f"{prefix}.downsample.1", planes)
            inplanes = planes
    state += _bn("bn2", 512)
    state += [("fc.weight", (num_features, 512 * 7 * 7)), ("fc.bias", (num_features,))]
    state += _bn("features", num_features)
    return state


def _is_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in {"running_mean", "running_var", "num_batches_tracked"}


def test_iresnet50_state_dict_matches_insightface() -> None:
    model = build_backbone("iresnet50", embedding_size=512)
    expected = insightface_iresnet_state([3, 4, 14, 3], 512)
    assert [(key, tuple(value.shape)) for key, value in model.state_dict().items()] == expected


def test_iresnet50_parameter_count_matches_insightface() -> None:
    expected = insightface_iresnet_state([3, 4, 14, 3], 512)
    reference_count = sum(torch.Size(shape).numel() for key, shape in expected if not _is_buffer(key))
    assert reference_count == IRESNET50_PARAMETERS
    model = build_backbone("iresnet50", embedding_size=512)
    assert sum(p.numel() for p in model.parameters()) == IRESNET50_PARAMETERS


@pytest.mark.parametrize(
    ("name", "layers"),
    [
        ("iresnet18", [2, 2, 2, 2]),
        ("iresnet34", [3, 4, 6, 3]),
        ("iresnet100", [3, 13, 30, 3]),
        ("iresnet200", [6, 26, 60, 6]),
    ],
)
def test_iresnet_depths_match_insightface(name: str, layers: list[int]) -> None:
    model = build_backbone(name, embedding_size=128)
    expected = insightface_iresnet_state(layers, 128)
    assert [(key, tuple(value.shape)) for key, value in model.state_dict().items()] == expected


def test_iresnet_embedding_scale_is_frozen_at_one() -> None:
    model = build_backbone("iresnet18")
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))
    model(torch.randn(2, 3, 112, 112)).square().sum().backward()
    assert model.features.weight.grad is None
    assert model.conv1.weight.grad is not None


def test_mobilefacenet_matches_insightface_layout() -> None:
    state = {key: tuple(value.shape) for key, value in build_backbone("mobilefacenet").state_dict().items()}
    assert state["layers.0.layers.0.weight"] == (128, 3, 3, 3)  # stem conv, 64 * scale 2
    assert state["layers.1.layers.0.weight"] == (128, 2, 3, 3)  # 3x3 conv with groups=64
    assert state["layers.2.layers.1.layers.0.weight"] == (128, 1, 3, 3)  # depthwise, stride 2
    assert state["layers.5.layers.5.layers.2.layers.0.weight"] == (256, 256, 1, 1)  # 6th block of stage 3
    assert state["layers.7.layers.1.layers.0.layers.0.weight"] == (256, 256, 1, 1)  # 2nd block of stage 4
    assert "layers.7.layers.2.layers.0.layers.0.weight" not in state
    assert state["conv_sep.layers.2.weight"] == (512,)  # PReLU
    assert state["features.layers.0.layers.0.weight"] == (512, 1, 7, 7)  # GDC
    assert state["features.layers.2.weight"] == (512, 512)
    assert state["features.layers.3.running_var"] == (512,)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_maps_faces_to_embeddings(name: str) -> None:
    model = build_backbone(name, embedding_size=512)  # train mode: BN on batch statistics keeps a fresh net finite
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "tiny"])
def test_channels_last_gives_the_same_embeddings(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=64)
    images = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        reference = model(images)
        model = model.to(memory_format=torch.channels_last)
        out = model(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_tiny_trains_with_a_custom_width() -> None:
    model = build_backbone("tiny", embedding_size=32, width=8)
    out = model(torch.randn(4, 3, 112, 112))
    out.square().mean().backward()
    assert out.shape == (4, 32)
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'.*iresnet50.*mobilefacenet.*tiny"):
        build_backbone("resnet50")


def test_unexpected_backbone_argument_is_named() -> None:
    with pytest.raises(ValueError, match="iresnet18.*width"):
        build_backbone("iresnet18", width=8)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "tiny"])
def test_wrong_input_size_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match=r"expects input \[B, 3, 112, 112\], got \[1, 3, 96, 96\]"):
        build_backbone(name)(torch.randn(1, 3, 96, 96))
