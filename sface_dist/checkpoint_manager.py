"""A run's checkpoint lifecycle: when to write one, writing it on every rank, and what resuming restores.

The trainer's one door to ``checkpoint`` (the on-disk format): it says which steps are due
(``train.checkpoint_every``), writes collectively keeping the last ``train.keep_checkpoints``, and
reads back the newest checkpoint, refusing one whose model differs from the run's config.
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

CHECKED_MODEL_KEYS = ("backbone", "embedding_size")
"""``model`` keys a resumed checkpoint must share with the config: they decide the backbone's tensors."""


@dataclass(frozen=True)
class Resumed:
    """What a rank restores from a checkpoint: the trainer's state and its own class range of the head."""

    path: Path
    trainer: TrainerState
    head: dict[str, Any]
    """The head shard's ``state_dict()`` for this rank's class range."""
    head_optimizer: dict[str, Any]
    """The head optimizer's ``state_dict()`` for the same range."""


class CheckpointManager:
    """The checkpoints of the run in ``output`` on this rank (built on every rank with the same arguments).

    ``config`` is the run's resolved config: stored in every manifest, and its ``model`` checked on resume.
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
        self._check_model(path)
        trainer = load_trainer_state(path)
        head, head_optimizer = load_head_shard(path, class_range, self.num_classes)
        return Resumed(path, trainer, head, head_optimizer)

    def _check_model(self, path: Path) -> None:
        """One line naming the key when the checkpoint's model differs from the config's."""
        saved = read_manifest(path).get("config", {}).get("model", {})
        wanted = self.config.get("model", {})
        for key in CHECKED_MODEL_KEYS:
            if key in saved and saved[key] != wanted.get(key):
                raise CheckpointError(
                    f"{path}: model.{key} is {saved[key]!r} in the checkpoint and {wanted.get(key)!r} "
                    f"in the config: restore it, or start a new run (another train.output, or train.overwrite=true)"
                )
