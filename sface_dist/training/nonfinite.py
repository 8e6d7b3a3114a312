"""``train.on_nonfinite``: what an optimizer step does when its loss or a gradient holds NaN or inf."""

from __future__ import annotations

import torch
from torch import Tensor

from sface_dist.config import OnNonFinite
from sface_dist.parallel.collectives import all_reduce_max

CHECKED = ("loss", "backbone gradient", "head gradient")
"""What an optimizer step checks for NaN and inf, in the order of ``NonFiniteWatch``'s flags."""


class NonFiniteWatch:
    """Non-finite losses and gradients, by ``train.on_nonfinite``.

    ``stop`` keeps the first bad (step, quantity) on the device, read at log steps (no host sync a step);
    ``skip`` agrees across ranks and reads the outcome every step (one host sync a step), so that every
    rank skips the same steps, and stops after ``max_nonfinite`` in a row.
    """

    def __init__(self, policy: OnNonFinite, max_in_a_row: int, rank: int, device: torch.device) -> None:
        self.policy, self.max_in_a_row, self.rank = policy, max_in_a_row, rank
        self.step = torch.zeros((), dtype=torch.long, device=device)
        """This step's number, counted on the device."""
        self.first = torch.full((3,), -1, dtype=torch.long, device=device)
        """``stop``: (step, quantity, rank) of the first non-finite step; -1 while there is none."""
        self.in_a_row = 0
        self.streak_start: tuple[int, int, int] | None = None
        self.skipped = 0

    def update(self, step: int, finite: Tensor) -> bool:
        """Record this step's flags (one per ``CHECKED``); whether to apply the step's update."""
        self.step += 1
        if self.policy == "stop":
            bad = ~finite.all()
            found = torch.stack([self.step, (~finite).int().argmax(), torch.full_like(self.step, self.rank)])
            self.first = torch.where((self.first[0] < 0) & bad, found, self.first)
            return True
        ranks = all_reduce_max(torch.where(finite, 0, self.rank + 1).long(), None).tolist()
        if not any(ranks):
            self.in_a_row, self.streak_start = 0, None
            return True
        quantity = next(i for i, rank in enumerate(ranks) if rank)
        if self.streak_start is None:
            self.streak_start = (step, quantity, ranks[quantity] - 1)
        self.in_a_row += 1
        self.skipped += 1
        return False

    def describe(self, step: int, quantity: int, rank: int) -> str:
        return f"step {step}: the {CHECKED[quantity]} is not finite on rank {rank}"

    def error(self, kept: str) -> FloatingPointError | None:
        """This rank's error when the run must stop (reads the device record under ``stop``)."""
        hint = "lower optim.lr or enable head.check_inputs to find the offending rows"
        if self.policy == "skip":
            if self.streak_start is None or self.in_a_row < self.max_in_a_row:
                return None
            first = self.describe(*self.streak_start)
            return FloatingPointError(
                f"{first} and on the {self.in_a_row - 1} steps after it (train.max_nonfinite={self.max_in_a_row}): "
                f"stopped; {kept}; {hint}"
            )
        step, quantity, rank = self.first.tolist()
        if step < 0 or (CHECKED[quantity] != "head gradient" and self.rank != 0):
            return None
        return FloatingPointError(f"{self.describe(step, quantity, rank)} (the first such step); {kept}; {hint}")


