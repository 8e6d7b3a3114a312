"""Embedding uint8 crops with a backbone: pixel normalisation, the flip test, eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sface_dist.evaluation.embedder import TorchEmbedder, embed_images, embed_views


class _PixelSum(nn.Module):
    """Deterministic 'embedding' whose value depends on the mirror: column sums weighted by position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.arange(x.shape[-1], dtype=x.dtype)
        return torch.stack([x.mean(dim=(1, 2, 3)), (x.mean(dim=(1, 2)) * weights).sum(-1)], dim=1)


def test_embed_images_normalises_flips_and_restores_mode() -> None:
    images = torch.randint(0, 256, (5, 3, 112, 112), dtype=torch.uint8)
    model = _PixelSum().train()
    embed = TorchEmbedder(model, "cpu")
    flipped = embed_images(embed, images, batch_size=2, flip=True)
    plain = embed_images(embed, images, batch_size=3, flip=False)
    assert model.training
    x = (images.float() - 127.5) / 127.5
    torch.testing.assert_close(plain, model(x))
    torch.testing.assert_close(flipped, model(x) + model(x.flip(3)))
    assert embed_views(embed, images, batch_size=4).shape == (2, 5, 2)


def test_embed_images_runs_the_model_in_eval_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 112 * 112, 4), nn.Dropout(0.9)).train()
    images = torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8)
    embed = TorchEmbedder(model, "cpu")
    first = embed_images(embed, images, batch_size=2)
    assert torch.equal(first, embed_images(embed, images, batch_size=2))
    assert model.training and not first.requires_grad


def test_embed_images_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="expected uint8 images"):
        embed_images(TorchEmbedder(_PixelSum()), torch.zeros(2, 3, 112, 112), batch_size=2)
