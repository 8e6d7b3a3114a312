"""Backbone registry: one name -> one constructor, so configs select a backbone by string."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

from torch import nn

from sface_dist.backbones.iresnet import IRESNET_LAYERS, IResNet
from sface_dist.backbones.mobilefacenet import MobileFaceNet, TinyFaceNet
from sface_dist.backbones.vit import VIT_VARIANTS, VisionTransformer

_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(IResNet, layers) for name, layers in IRESNET_LAYERS.items()},
    "mobilefacenet": MobileFaceNet,
    "tiny": TinyFaceNet,
    **{name: partial(VisionTransformer, **asdict(variant)) for name, variant in VIT_VARIANTS.items()},
}

BACKBONES: tuple[str, ...] = tuple(_CONSTRUCTORS)


def build_backbone(name: str, embedding_size: int = 512, **kwargs: object) -> nn.Module:
    """Build backbone ``name`` with an ``embedding_size``-d output; ``kwargs`` go to its constructor.

    Extra arguments: iresnet* take ``dropout``; mobilefacenet takes ``blocks`` and
    ``scale``; tiny takes ``width``; vit_* take ``drop_path``, ``mask_ratio`` and
    ``activation_checkpointing`` (their defaults are the variant's, ``VIT_VARIANTS``).
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be positive, got {embedding_size}")
    constructor = _CONSTRUCTORS[name]
    try:
        inspect.signature(constructor).bind(embedding_size=embedding_size, **kwargs)
    except TypeError as error:
        raise ValueError(f"backbone {name!r}: {error}") from None
    return constructor(embedding_size=embedding_size, **kwargs)


def compile_backbone(module: nn.Module, backend: str | Callable[..., object] = "inductor") -> nn.Module:
    """``torch.compile`` ``module`` in place (``model.compile``): its parameter names and ``state_dict`` keys stay
    those of the plain module, so checkpoints do not depend on the option."""
    module.compile(backend=backend)
    return module
