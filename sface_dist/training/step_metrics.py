"""An optimizer step's metrics: stacked on the device while the loop runs, read on the host at log steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sface_dist.heads import HeadOutput


@dataclass
class StepMetrics:
    """An optimizer step's metrics on the host (the mean over its micro-batches)."""

    loss: float
    cos_target: float
    cos_nontarget: float
    accuracy: float
    diagnostics: dict[str, float]
    """The head type's own terms (``HeadOutput.diagnostics``), logged after the loss."""

    @classmethod
    def from_tensor(cls, values: Tensor, diagnostic_names: tuple[str, ...]) -> StepMetrics:
        """Read a ``metric_tensor`` (one host sync); ``diagnostic_names`` name its entries after the fourth."""
        loss, cos_target, cos_nontarget, accuracy, *terms = values.tolist()
        return cls(loss, cos_target, cos_nontarget, accuracy, dict(zip(diagnostic_names, terms, strict=True)))

    def scalars(self) -> dict[str, float]:
        """Every metric by name, the head's terms included."""
        return {"loss": self.loss, **self.diagnostics, "cos_target": self.cos_target,
                "cos_nontarget": self.cos_nontarget, "accuracy": self.accuracy}


def metric_tensor(out: HeadOutput) -> Tensor:
    """The ``StepMetrics`` of a head output, stacked on the device (no host sync): loss, cos_target,
    cos_nontarget, accuracy, then ``out.diagnostics`` in their order."""
    return torch.stack(
        [out.loss.detach(), out.cos_target, out.cos_nontarget, out.accuracy, *out.diagnostics.values()]
    )




@dataclass(frozen=True)
class DeviceMetrics:
    """An optimizer step's metrics still on the device (``metric_tensor`` order: the mean over its micro-steps),
    with the names of the head's own terms."""

    values: Tensor
    diagnostic_names: tuple[str, ...]

    def read(self) -> StepMetrics:
        """One host sync."""
        return StepMetrics.from_tensor(self.values, self.diagnostic_names)
