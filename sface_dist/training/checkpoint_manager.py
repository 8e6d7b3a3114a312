"""A run's checkpoint lifecycle: when to write one, what goes into it, and restoring it into the components.

The trainer's one door to ``checkpoint`` (the on-disk format). It is handed the run's stateful components by
name (``state.Stateful``): those of ``trainer.pt``, which rank 0 writes and every rank loads, and those of the
head shard, which every rank writes for its class range and loads for whichever range it owns at resume. It
says which steps are due (``train.checkpoint_every``), writes collectively keeping the last
``train.keep_checkpoints``, and restores the newest checkpoint into the components, refusing one of another
run: a checkpoint whose config differs from the run's in a key that defines the run
(``config.RUN_DEFINING_KEYS``) unless ``train.accept_changes`` names it. Whatever does not fit is one line
naming the checkpoint (``CheckpointError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sface_dist.checkpoint import (
    RUN_CHECKPOINTS,
    CheckpointError,
    latest_checkpoint,
    load_head_shard,
    load_trainer_state,
    read_manifest,
    save_checkpoint,
)
from sface_dist.config import ConfigChange, config_changes
from sface_dist.training.state import Stateful

HEAD_SHARD_KEYS = ("head", "optimizer")
"""The components of a head file: the head shard and its optimizer, each a class-range ``state_dict``."""


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run resumed from."""

    path: Path
    world_size: int
    """The number of ranks that wrote it (0: not recorded)."""
    changes: list[ConfigChange]
    """The keys whose values differ from the checkpoint's config (run-defining ones only if accepted)."""


class CheckpointManager:
    """The checkpoints of the run in ``output`` on this rank (built on every rank with the same arguments).

    ``config`` is the run's resolved config: stored in every manifest, and compared with the checkpoint's on
    resume. ``trainer_state``: the components of ``trainer.pt``, restored in this order; their state dicts hold
    disjoint keys. ``head_shard``: ``HEAD_SHARD_KEYS`` to the components of this rank's head file, which holds
    the classes ``class_range``.
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
        trainer_state: Mapping[str, Stateful],
        head_shard: Mapping[str, Stateful],
        class_range: tuple[int, int],
    ) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every {every} steps keeping {keep}: both must be >= 1")
        if tuple(head_shard) != HEAD_SHARD_KEYS:
            raise ValueError(f"head_shard: expected the components {HEAD_SHARD_KEYS}, got {tuple(head_shard)}")
        self.root = Path(output) / RUN_CHECKPOINTS
        self.rank, self.world_size = rank, world_size
        self.every, self.keep = every, keep
        self.num_classes, self.config = num_classes, config
        self.trainer_state, self.head_shard, self.class_range = trainer_state, head_shard, class_range

    def due(self, step: int) -> bool:
        """Whether the schedule writes a checkpoint after optimizer step ``step``."""
        return step % self.every == 0

    def latest(self) -> Path | None:
        """The newest complete checkpoint of the run, if any."""
        return latest_checkpoint(self.root)

    def _trainer_file(self) -> dict[str, Any]:
        """Collective under DeepSpeed (the engine gathers its optimizer partitions): ``trainer.pt``'s dict."""
        merged: dict[str, Any] = {}
        for name, component in self.trainer_state.items():
            state = component.state_dict()
            if overlap := merged.keys() & state.keys():
                raise ValueError(f"component {name} writes the keys {sorted(overlap)} another one writes")
            merged.update(state)
        return merged

    def save(self) -> Path:
        """Collective: publish the checkpoint of the components' current step atomically and prune to the last
        ``keep``."""
        head, optimizer = (self.head_shard[key].state_dict() for key in HEAD_SHARD_KEYS)
        return save_checkpoint(
            self.root,
            rank=self.rank,
            world_size=self.world_size,
            trainer_state=self._trainer_file(),
            head_state=head,
            head_optimizer_state=optimizer,
            num_classes=self.num_classes,
            config=self.config,
            keep=self.keep,
        )

    def restore(self) -> Resumed | None:
        """Load the newest checkpoint into every component (the head rows of ``class_range``); None when there is
        none yet."""
        path = self.latest()
        if path is None:
            return None
        manifest = read_manifest(path)
        changes = self._changes(path, manifest)
        trainer = load_trainer_state(path)
        shard = dict(zip(HEAD_SHARD_KEYS, load_head_shard(path, self.class_range, self.num_classes), strict=True))
        try:
            for component in self.trainer_state.values():
                component.load_state_dict(trainer)
            for key, component in self.head_shard.items():
                component.load_state_dict(shard[key])
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None
        return Resumed(path, int(manifest.get("world_size", 0)), changes)

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
