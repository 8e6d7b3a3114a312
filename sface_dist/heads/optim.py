"""SGD for a head shard that, under Partial-FC sampling, touches only the rows scored this step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sface_dist.config import SampleUpdate, check_choice
from sface_dist.heads.sharded import ShardedHead


class ShardSGD(torch.optim.SGD):
    """``torch.optim.SGD`` over ``head.weight``. With sampling and ``sample_update="rows"``, weight
    decay and momentum act on the sampled rows alone, so an unsampled class keeps its weight and
    momentum unchanged.

    ``sample_update="shard"`` is insightface's PartialFC_V2: plain SGD over the whole shard,
    where unsampled rows get zero gradient but are still decayed and still move with their momentum.
    """

    def __init__(
        self,
        head: ShardedHead,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        sample_update: SampleUpdate = "rows",
    ) -> None:
        check_choice(sample_update, SampleUpdate, "head.sample_update")
        super().__init__([head.weight], lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.head = head
        self.sample_update = sample_update

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if self.head.sample is None or self.sample_update == "shard":
            return super().step(closure)
        rows = self.head.sample.rows
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weight = self.head.weight
        if weight.grad is None:
            return loss
        group = self.param_groups[0]
        grad = weight.grad.index_select(0, rows)
        rows_weight = weight.index_select(0, rows)
        if group["weight_decay"]:
            grad.add_(rows_weight, alpha=group["weight_decay"])
        if group["momentum"]:
            state = self.state[weight]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(weight)
            buffer = state["momentum_buffer"]
            grad = buffer.index_select(0, rows).mul_(group["momentum"]).add_(grad)
            buffer.index_copy_(0, rows, grad)
        weight.index_copy_(0, rows, rows_weight.sub_(grad, alpha=group["lr"]))
        return loss
