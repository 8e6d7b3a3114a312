"""The state protocol of the training components, and the two small components the loop itself owns.

Every stateful component (the backbone's engine, the optimization's schedules, the head shard and its
optimizer, the progress, the RNG) has ``state_dict()`` and ``load_state_dict()``; ``CheckpointManager`` is
handed them by name and saves and restores them together. A component's ``load_state_dict`` raises
``ValueError`` with one line saying what does not fit; the manager adds the checkpoint's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Stateful(Protocol):
    """What ``CheckpointManager`` saves and restores."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingProgress:
    """How far a run is, in units that mean the same at every world size.

    ``step`` counts this run's optimizer steps, ``samples`` the images trained on, ``epoch_samples`` the position
    in the current epoch's permutation, and ``schedule_batch`` the global batch the run started with: the unit of
    ``train.steps`` and ``optim.warmup_steps``, so a run resumed on another number of ranks keeps its learning-rate
    schedule, its total length and its epoch position.
    """

    step: int
    samples: int
    epoch: int
    epoch_samples: int
    schedule_batch: int

    def advance(self, global_batch: int) -> None:
        """Count one optimizer step of ``global_batch`` samples."""
        self.step += 1
        self.samples += global_batch
        self.epoch_samples += global_batch

    def end_epoch(self) -> None:
        self.epoch += 1
        self.epoch_samples = 0

    def state_dict(self) -> dict[str, Any]:
        """``trainer.pt``'s ``step`` and ``progress``."""
        position = {"samples": self.samples, "epoch": self.epoch, "epoch_samples": self.epoch_samples,
                    "schedule_batch": self.schedule_batch}
        return {"step": self.step, "progress": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = state["progress"]
        keys = ("samples", "epoch", "epoch_samples", "schedule_batch")
        if not isinstance(position, dict) or not all(isinstance(position.get(key), int) for key in keys):
            raise ValueError(f"the progress record is not {{{', '.join(keys)}}} as integers")
        self.step = int(state["step"])
        self.samples, self.epoch, self.epoch_samples, self.schedule_batch = (position[key] for key in keys)


class RNGState:
    """The process's torch (and CUDA) random generators."""

    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng = state["rng"]
        try:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        except (TypeError, KeyError, RuntimeError) as error:
            raise ValueError(f"the RNG state does not load: {error}") from None
