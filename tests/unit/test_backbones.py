"""Backbones: registry, output shapes, insightface checkpoint compatibility."""

from __future__ import annotations

import pytest
import torch

from sface_dist.backbones import BACKBONES, build_backbone, compile_backbone
from sface_dist.backbones.vit import VisionTransformer

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


# The ViTs take seconds to build at full size: their layout is checked on meta, their forward at a small width.
@pytest.mark.parametrize("name", [name for name in BACKBONES if not name.startswith("vit_")])
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


# insightface get_model: (embed_dim, depth) of vit_t, vit_s, vit_b and vit_l_dp005_mask_005.
VIT_SIZES = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}
# sum(p.numel() for p in model.parameters()) of insightface's VisionTransformer built with get_model's arguments
# for each name and num_features=512.
VIT_PARAMETERS = {"vit_t": 19_137_792, "vit_s": 76_023_296, "vit_b": 113_833_472, "vit_l": 255_684_352}


def insightface_vit_state(dim: int, depth: int, num_features: int) -> list[tuple[str, tuple[int, ...]]]:
    """state_dict (key, shape) list of insightface's VisionTransformer (patch 9, image 112, LayerNorm, no qkv bias).

    Written from ``recognition/arcface_torch/backbones/vit.py``: the net's own parameters pos_embed and mask_token
    come first, then patch_embed.proj, the blocks (norm1, norm2, attn.qkv, attn.proj, mlp.fc1, mlp.fc2), norm and
    the feature head Linear(144 dim, dim, no bias), BN, Linear(dim, num_features, no bias), BN.
    """
    patches = (112 // 9) ** 2
    state = [("pos_embed", (1, patches, dim)), ("mask_token", (1, 1, dim))]
    state += [("patch_embed.proj.weight", (dim, 3, 9, 9)), ("patch_embed.proj.bias", (dim,))]
    for block in range(depth):
        prefix = f"blocks.{block}"
        for norm in ("norm1", "norm2"):
            state += [(f"{prefix}.{norm}.weight", (dim,)), (f"{prefix}.{norm}.bias", (dim,))]
        state += [(f"{prefix}.attn.qkv.weight", (3 * dim, dim))]
        state += [(f"{prefix}.attn.proj.weight", (dim, dim)), (f"{prefix}.attn.proj.bias", (dim,))]
        state += [(f"{prefix}.mlp.fc1.weight", (4 * dim, dim)), (f"{prefix}.mlp.fc1.bias", (4 * dim,))]
        state += [(f"{prefix}.mlp.fc2.weight", (dim, 4 * dim)), (f"{prefix}.mlp.fc2.bias", (dim,))]
    state += [("norm.weight", (dim,)), ("norm.bias", (dim,)), ("feature.0.weight", (dim, patches * dim))]
    state += _bn("feature.1", dim) + [("feature.2.weight", (num_features, dim))] + _bn("feature.3", num_features)
    return state


def vit_parameter_formula(dim: int, depth: int, num_features: int) -> int:
    """Per block 12 dim^2 + 10 dim (qkv 3d^2, proj d^2 + d, MLP 8d^2 + 5d, two LayerNorms 4d); patch conv 243 d + d,
    position 144 d, mask token d, final LayerNorm 2d, feature head 144 d^2 + 2d + d * num_features + 2 num_features."""
    block = 12 * dim * dim + 10 * dim
    return depth * block + 244 * dim + 144 * dim + dim + 2 * dim + 144 * dim * dim + 2 * dim + dim * num_features + (
        2 * num_features
    )


@pytest.mark.parametrize("name", list(VIT_SIZES))
def test_vit_matches_insightface_layout_and_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = build_backbone(name, embedding_size=512)
    dim, depth = VIT_SIZES[name]
    assert [(key, tuple(value.shape)) for key, value in model.state_dict().items()] == insightface_vit_state(
        dim, depth, 512
    )
    assert vit_parameter_formula(dim, depth, 512) == VIT_PARAMETERS[name]
    assert sum(p.numel() for p in model.parameters()) == VIT_PARAMETERS[name]


def small_vit(**kwargs: object) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(embed_dim=16, depth=2, num_heads=4, embedding_size=8, **kwargs)


def vit_reference(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """fp64 eval-mode forward written out: explicit softmax(q k^T / sqrt(d_head)) v attention per head."""
    p = {key: value.double() for key, value in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    x = torch.nn.functional.conv2d(images.double(), p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=9)
    x = x.flatten(2).transpose(1, 2) + p["pos_embed"]

    def layer_norm(t: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(t, (dim,), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    for b in range(len(model.blocks)):
        pre = f"blocks.{b}"
        q, k, v = (layer_norm(x, f"{pre}.norm1") @ p[f"{pre}.attn.qkv.weight"].T).chunk(3, dim=-1)
        split = [t.unflatten(-1, (heads, dim // heads)).transpose(1, 2) for t in (q, k, v)]
        attention = torch.softmax(split[0] @ split[1].transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
        out = (attention @ split[2]).transpose(1, 2).flatten(2)
        x = x + out @ p[f"{pre}.attn.proj.weight"].T + p[f"{pre}.attn.proj.bias"]
        hidden = layer_norm(x, f"{pre}.norm2") @ p[f"{pre}.mlp.fc1.weight"].T + p[f"{pre}.mlp.fc1.bias"]
        x = x + hidden.clamp(0, 6) @ p[f"{pre}.mlp.fc2.weight"].T + p[f"{pre}.mlp.fc2.bias"]
    x = layer_norm(x, "norm").flatten(1)

    def batch_norm(t: torch.Tensor, name: str) -> torch.Tensor:
        scale = p[f"{name}.weight"] / (p[f"{name}.running_var"] + 2e-5).sqrt()
        return (t - p[f"{name}.running_mean"]) * scale + p[f"{name}.bias"]

    x = batch_norm(x @ p["feature.0.weight"].T, "feature.1")
    return batch_norm(x @ p["feature.2.weight"].T, "feature.3")


def test_vit_eval_forward_matches_fp64_reference() -> None:
    model = small_vit(drop_path=0.1, mask_ratio=0.25)
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the init: the MLP must reach ReLU6's cap
            parameter.normal_(0, 0.3)
        for block in model.blocks:
            block.mlp.fc1.weight.normal_(0, 2.0)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    model.eval()
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        out = model(images)
    torch.testing.assert_close(out.double(), vit_reference(model, images), rtol=1e-4, atol=1e-4)


def test_vit_training_masks_patches_and_trains_every_parameter() -> None:
    model = small_vit(drop_path=0.1, mask_ratio=0.25)
    tokens_seen: list[int] = []
    model.norm.register_forward_hook(lambda module, inputs, output: tokens_seen.append(inputs[0].shape[1]))
    out = model(torch.randn(4, 3, 112, 112))
    out.square().mean().backward()
    assert out.shape == (4, 8)
    assert tokens_seen == [int(144 * 0.75)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 112, 112))
    assert tokens_seen[-1] == 144


def test_vit_activation_checkpointing_keeps_the_gradients() -> None:
    images = torch.randn(4, 3, 112, 112)
    grads = []
    for checkpointing in (False, True):
        model = small_vit(drop_path=0.2, mask_ratio=0.25, activation_checkpointing=checkpointing)
        torch.manual_seed(1)
        model(images).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)


def test_compile_backbone_compiles_in_place_with_the_same_outputs_and_keys() -> None:
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=16, width=4)
    images = torch.randn(2, 3, 112, 112)
    reference = model(images)
    reference.square().sum().backward()
    reference_grads = [p.grad.clone() for p in model.parameters()]
    keys = list(model.state_dict())
    model.zero_grad(set_to_none=True)

    counter = CompileCounter()  # an eager backend that counts the graphs dynamo hands it
    assert compile_backbone(model, backend=counter) is model
    out = model(images)
    out.square().sum().backward()
    assert counter.frame_count >= 1
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(out, reference)
    for got, expected in zip((p.grad for p in model.parameters()), reference_grads, strict=True):
        torch.testing.assert_close(got, expected)
