"""Vision Transformer face backbones (insightface ``vit_t``, ``vit_s``, ``vit_b``, ``vit_l``).

Architecture and parameter names follow insightface's
``recognition/arcface_torch/backbones/vit.py`` so that its checkpoints load with
``load_state_dict``: a 9x9-patch embedding (12x12 patches of the 112x112 face; the
last 4 pixel rows and columns fall outside every patch), learned position
embeddings, pre-norm blocks with a ReLU6 MLP, stochastic depth, and, in training,
random masking of a share of the patches, which re-enter after the blocks as a
learned mask token. The feature head flattens all patch tokens:
Linear-BN1d-Linear-BN1d to the embedding.

Unlike the peer, the forward pass holds no autocast regions or dtype casts (the
trainer picks the precision) and attention is ``scaled_dot_product_attention``,
which dispatches to fused kernels on GPU and accumulates the softmax in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

INPUT_SIZE = 112
PATCH_SIZE = 9
NUM_PATCHES = (INPUT_SIZE // PATCH_SIZE) ** 2
MLP_RATIO = 4
_FEATURE_BN_EPS = 2e-5


@dataclass(frozen=True)
class ViTVariant:
    """One named size of the insightface ViT."""

    embed_dim: int
    depth: int
    num_heads: int
    drop_path: float
    """Stochastic-depth rate of the last block; block ``i`` drops with ``drop_path * i / (depth - 1)``."""
    mask_ratio: float
    """Share of the patch tokens dropped before the blocks in training."""
    activation_checkpointing: bool
    """Recompute each block's activations in backward instead of storing them."""


# insightface get_model: vit_t, vit_s and vit_b as named there; vit_l is its vit_l_dp005_mask_005 (no plain vit_l).
VIT_VARIANTS: dict[str, ViTVariant] = {
    "vit_t": ViTVariant(256, 12, 8, drop_path=0.1, mask_ratio=0.1, activation_checkpointing=False),
    "vit_s": ViTVariant(512, 12, 8, drop_path=0.1, mask_ratio=0.1, activation_checkpointing=False),
    "vit_b": ViTVariant(512, 24, 8, drop_path=0.1, mask_ratio=0.1, activation_checkpointing=True),
    "vit_l": ViTVariant(768, 24, 8, drop_path=0.05, mask_ratio=0.05, activation_checkpointing=True),
}


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class PatchEmbed(nn.Module):
    """Non-overlapping ``PATCH_SIZE`` convolution: [B, 3, 112, 112] -> [B, NUM_PATCHES, embed_dim]."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias (the peer's ``qkv_bias=False``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Linear-ReLU6-Linear, hidden width ``MLP_RATIO * dim``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches."""

    def __init__(self, dim: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT for aligned 3x112x112 faces; returns un-normalised ``[B, embedding_size]`` embeddings."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        embedding_size: int = 512,
        drop_path: float = 0.0,
        mask_ratio: float = 0.0,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"ViT: mask_ratio must be in [0, 1), got {mask_ratio}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"ViT: drop_path must be in [0, 1), got {drop_path}")
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PATCHES, embed_dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * NUM_PATCHES, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=_FEATURE_BN_EPS),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=_FEATURE_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        """The peer's init: Linear weights truncated N(0, 0.02) with zero bias, LayerNorm (1, 0), tokens N(0, 0.02)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"VisionTransformer expects input [B, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {list(x.shape)}")
        batch = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        if self.training and self.mask_ratio > 0:
            x = self._masked_blocks(x)
        else:
            x = self.norm(self._run_blocks(x))
        return self.feature(x.reshape(batch, NUM_PATCHES * self.embed_dim))

    def _masked_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks on a random ``1 - mask_ratio`` of each sample's patches; the rest become the mask token."""
        batch, tokens, dim = x.shape
        kept = int(tokens * (1 - self.mask_ratio))
        order = torch.rand(batch, tokens, device=x.device).argsort(dim=1)
        restore = order.argsort(dim=1)
        x = x.gather(1, order[:, :kept, None].expand(-1, -1, dim))
        x = self.norm(self._run_blocks(x))
        x = torch.cat([x, self.mask_token.expand(batch, tokens - kept, dim)], dim=1)
        return x.gather(1, restore[:, :, None].expand(-1, -1, dim))
