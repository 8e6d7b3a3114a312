"""A run's checkpoint lifecycle: when to write one, writing it on every rank, and what resuming restores.

The trainer's one door to ``checkpoint`` (the on-disk format): it says which steps are due
(``train.checkpoint_every``), writes collectively keeping the last ``train.keep_checkpoints``, and
reads back the newest checkpoint, refusing one of another run: a checkpoint whose config differs from the
run's in a key that defines the run (``config.RUN_DEFINING_KEYS``) unless ``train.accept_changes`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sface_dist.checkpoint import (
    RUN_CHECKPOINTS,
    CheckpointError,
    TrainerState,
    latest_checkpoint,
    load_head_shard,
    load_trainer_state,
    read_manifest,
    save_checkpoint,
)
from sface_dist.config import ConfigChange, config_changes


@dataclass(frozen=True)
class Resumed:
    """What a rank restores from a checkpoint: the trainer's state and its own class range of the head."""

    path: Path
    trainer: TrainerState
    head: dict[str, Any]
    """The head shard's ``state_dict()`` for this rank's class range."""
    head_optimizer: dict[str, Any]
    """The head optimizer's ``state_dict()`` for the same range."""
    world_size: int
    """The number of ranks that wrote the checkpoint."""
    changes: list[ConfigChange]
    """The keys whose values differ from the checkpoint's config (run-defining ones only if accepted)."""


class CheckpointManager:
    """The checkpoints of the run in ``output`` on this rank (built on every rank with the same arguments).

    ``config`` is the run's resolved config: stored in every manifest, and compared with the checkpoint's on
    resume.
    """

    def __init__(
        self,
        output: Path,
        *,
        rank: int,
        world_size: int,
        every: int,
        keep: int,
        num_classes: int,
        config: dict[str, Any],
    ) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every {every} steps keeping {keep}: both must be >= 1")
        self.root = Path(output) / RUN_CHECKPOINTS
        self.rank, self.world_size = rank, world_size
        self.every, self.keep = every, keep
        self.num_classes, self.config = num_classes, config

    def due(self, step: int) -> bool:
        """Whether the schedule writes a checkpoint after optimizer step ``step``."""
        return step % self.every == 0

    def latest(self) -> Path | None:
        """The newest complete checkpoint of the run, if any."""
        return latest_checkpoint(self.root)

    def save(self, state: TrainerState, head_state: dict[str, Any], head_optimizer_state: dict[str, Any]) -> Path:
        """Collective: publish the checkpoint of ``state.step`` atomically and prune to the last ``keep``.

        ``head_state`` and ``head_optimizer_state``: this rank's head shard's and its optimizer's ``state_dict()``.
        """
        return save_checkpoint(
            self.root,
            rank=self.rank,
            world_size=self.world_size,
            trainer_state=state,
            head_state=head_state,
            head_optimizer_state=head_optimizer_state,
            num_classes=self.num_classes,
            config=self.config,
            keep=self.keep,
        )

    def resume(self, class_range: tuple[int, int]) -> Resumed | None:
        """The newest checkpoint's state, with the head rows of ``class_range``; None when there is none yet."""
        path = self.latest()
        if path is None:
            return None
        manifest = read_manifest(path)
        changes = self._changes(path, manifest)
        trainer = load_trainer_state(path)
        head, head_optimizer = load_head_shard(path, class_range, self.num_classes)
        return Resumed(path, trainer, head, head_optimizer, int(manifest.get("world_size", 0)), changes)

    def _changes(self, path: Path, manifest: dict[str, Any]) -> list[ConfigChange]:
        """The config's changes since the checkpoint; one line naming them when one makes it another run."""
        saved = manifest.get("config")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: its manifest holds no config to compare this run's with")
        changes = config_changes(saved, self.config)
        accepted = set(self.config.get("train", {}).get("accept_changes", []))
        refused = [change for change in changes if change.defines_the_run and change.key not in accepted]
        if not refused:
            return changes
        new_run = "start a new run (another train.output, or train.overwrite=true)"
        unfit = [change for change in refused if not change.acceptable]
        if unfit:
            raise CheckpointError(f"{path}: {unfit[0].describe()}: restore it, or {new_run}")
        keys = ",".join(change.key for change in refused)
        raise CheckpointError(
            f"{path}: {'; '.join(change.describe() for change in refused)}: another run: restore "
            f"{'it' if len(refused) == 1 else 'them'}, {new_run}, or accept the change with "
            f"--set 'train.accept_changes=[{keys}]'"
        )
