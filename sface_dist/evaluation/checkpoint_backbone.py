"""The backbone of a training checkpoint, or of insightface's weights: rebuild the network, load its weights.

Any path ``checkpoint.resolve_checkpoint`` accepts: a checkpoint step directory, a run's ``checkpoints``
directory or its ``latest`` pointer file, a run directory, or a best-backbone folder that
``VerificationMonitor`` writes. The architecture comes from the config that the checkpoint's manifest
embeds, so no separate config file can disagree with the weights. Any other file is taken for arcface_torch's
saved backbone (``model.pt``, ``backbone.pth``, ``checkpoint_gpu_N.pt``): read like every weights file (no code
runs), its architecture and embedding size read from its names and shapes (``backbones.insightface``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sface_dist.backbones import build_backbone
from sface_dist.backbones.insightface import backbone_state, checked_state, identify
from sface_dist.checkpoint import (
    CheckpointError,
    names_a_checkpoint,
    read_backbone,
    read_foreign_weights,
    read_model_config,
    resolve_checkpoint,
    state_dict_mismatch,
)


@dataclass(frozen=True)
class LoadedBackbone:
    """A backbone rebuilt from a checkpoint, in eval mode on the CPU."""

    model: nn.Module
    path: Path
    weights_file: Path
    step: int | None
    """The training step of a checkpoint; None for insightface's weights."""
    backbone: str
    embedding_size: int
    config: dict[str, Any]

    @property
    def description(self) -> str:
        """What was loaded, for the tools' first line."""
        origin = f", step {self.step}" if self.step is not None else " (insightface weights)"
        return f"{self.backbone} ({self.embedding_size}-d) from {self.path}{origin}"


def load_insightface_backbone(path: Path) -> LoadedBackbone:
    """Rebuild and load the arcface_torch backbone saved in the file ``path``."""
    state = backbone_state(read_foreign_weights(path), str(path))
    name, embedding_size = identify(state, str(path))
    model = build_backbone(name, embedding_size)
    model.load_state_dict(checked_state(model, state, f"{name} ({embedding_size}-d)", str(path)))
    config = {"model": {"backbone": name, "embedding_size": embedding_size}}
    return LoadedBackbone(model.eval(), path, path, None, name, embedding_size, config)


def load_backbone(path: str | os.PathLike[str]) -> LoadedBackbone:
    """Rebuild and load the backbone of the checkpoint, or of insightface's weights file, at ``path``."""
    if not names_a_checkpoint(path):
        return load_insightface_backbone(Path(path))
    checkpoint = resolve_checkpoint(path)
    config, step = read_model_config(checkpoint)
    name, embedding_size = config["model"]["backbone"], int(config["model"]["embedding_size"])
    try:
        model = build_backbone(name, embedding_size)
    except ValueError as error:
        raise CheckpointError(f"{checkpoint}: model.backbone in its config: {error}") from None
    weights_file, state = read_backbone(checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{weights_file}: weights do not fit {name} ({embedding_size}-d): {state_dict_mismatch(error)}"
        ) from None
    return LoadedBackbone(model.eval(), checkpoint, weights_file, step, name, embedding_size, config)
