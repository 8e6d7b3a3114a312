"""The backbone of a training checkpoint: find the checkpoint, rebuild the network, load its weights.

Accepted paths: a checkpoint step directory (``manifest.json`` + ``trainer.pt``), a
run's ``checkpoints`` directory or its ``latest`` pointer file, a run directory (its
``checkpoints/latest``), or a best-backbone directory that ``VerificationMonitor``
writes (``manifest.json`` + ``backbone.pt``). The architecture comes from the config
that the manifest embeds, so no separate config file can disagree with the weights.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sface_dist.backbones import build_backbone
from sface_dist.checkpoint import (
    LATEST,
    MANIFEST,
    TRAINER_FILE,
    CheckpointError,
    follow_latest,
    load_weights,
    state_dict_mismatch,
)

BACKBONE_FILE = "backbone.pt"
"""Weights-only backbone state dict of a best-backbone directory."""


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


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory that ``path`` designates (see the module docstring)."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        return _follow_latest(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / MANIFEST).is_file():
        return path
    for pointer in (path / LATEST, path / "checkpoints" / LATEST):
        if pointer.is_file():
            return _follow_latest(pointer)
    raise CheckpointError(
        f"{path}: not a checkpoint: expected a step directory with {MANIFEST}, a run's checkpoints "
        f"directory or its '{LATEST}' file, or a run directory"
    )


def _follow_latest(pointer: Path) -> Path:
    try:
        return follow_latest(pointer)
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from None


def read_model_config(checkpoint: Path) -> tuple[dict[str, Any], int]:
    """The resolved config stored in ``checkpoint``'s manifest, and the checkpoint's step."""
    manifest_path = checkpoint / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({error})") from None
    config = manifest.get("config") if isinstance(manifest, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{manifest_path}: the manifest holds no 'config', so the backbone architecture is unknown "
            "(checkpoints written by this project's trainer embed their resolved config)"
        )
    model = config.get("model")
    if not isinstance(model, dict) or "backbone" not in model or "embedding_size" not in model:
        raise CheckpointError(f"{manifest_path}: config has no model.backbone / model.embedding_size")
    return config, int(manifest.get("step", 0))


def load_backbone(path: str | os.PathLike[str]) -> LoadedBackbone:
    """Rebuild and load the backbone of the checkpoint at ``path``."""
    checkpoint = resolve_checkpoint(path)
    config, step = read_model_config(checkpoint)
    name, embedding_size = config["model"]["backbone"], int(config["model"]["embedding_size"])
    try:
        model = build_backbone(name, embedding_size)
    except ValueError as error:
        raise CheckpointError(f"{checkpoint / MANIFEST}: {error}") from None
    weights_file, state = _backbone_state(checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{weights_file}: weights do not fit {name} ({embedding_size}-d): {state_dict_mismatch(error)}"
        ) from None
    return LoadedBackbone(model.eval(), checkpoint, weights_file, step, name, embedding_size, config)


def _backbone_state(checkpoint: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The file holding the backbone weights, and the weights."""
    if (checkpoint / BACKBONE_FILE).is_file():
        state = load_weights(checkpoint / BACKBONE_FILE)
        if not isinstance(state, dict):
            raise CheckpointError(f"{checkpoint / BACKBONE_FILE}: holds no backbone state dict")
        return checkpoint / BACKBONE_FILE, state
    trainer_file = checkpoint / TRAINER_FILE
    if not trainer_file.is_file():
        raise CheckpointError(f"{checkpoint}: has neither {TRAINER_FILE} nor {BACKBONE_FILE}")
    state = load_weights(trainer_file)
    if not isinstance(state, dict) or not isinstance(state.get("backbone"), dict):
        raise CheckpointError(f"{trainer_file}: holds no 'backbone' state dict")
    return trainer_file, state["backbone"]


def save_backbone(directory: str | os.PathLike[str], model: nn.Module, manifest: dict[str, Any]) -> Path:
    """Write ``backbone.pt`` and ``manifest.json`` (which must hold the run's ``config``) atomically."""
    directory = Path(directory)
    if not isinstance(manifest.get("config"), dict):
        raise ValueError("a backbone manifest needs the run's config to be loadable")
    temporary = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    temporary.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    torch.save(state, temporary / BACKBONE_FILE)
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.old{os.getpid()}")
        os.replace(directory, retired)
        os.replace(temporary, directory)
        shutil.rmtree(retired)
    else:
        os.replace(temporary, directory)
    return directory
