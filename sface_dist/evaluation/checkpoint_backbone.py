"""The backbone of a training checkpoint: find the checkpoint, rebuild the network, load its weights.

Any path ``checkpoint.resolve_checkpoint`` accepts: a checkpoint step directory, a run's ``checkpoints``
directory or its ``latest`` pointer file, a run directory, or a best-backbone folder that
``VerificationMonitor`` writes. The architecture comes from the config that the checkpoint's manifest
embeds, so no separate config file can disagree with the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sface_dist.backbones import build_backbone
from sface_dist.checkpoint import (
    CheckpointError,
    read_backbone,
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
    step: int
    backbone: str
    embedding_size: int
    config: dict[str, Any]


def load_backbone(path: str | os.PathLike[str]) -> LoadedBackbone:
    """Rebuild and load the backbone of the checkpoint at ``path``."""
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
