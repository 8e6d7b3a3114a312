"""SGD or AdamW for a head shard that, under Partial-FC sampling, can touch only the rows scored this step.

Every state tensor is per class row (momentum; AdamW's two moments and step count), so the
shard's ``state_dict()`` carries its class range and a checkpoint re-partitions it to any
number of ranks (``sface_dist/checkpoint.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sface_dist.config import OptimizerName, SampleUpdate, check_choice
from sface_dist.heads.sharded import ShardedHead

STATE_ROWS: dict[str, tuple[str, ...]] = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq", "step")}
"""The per-row state tensors of each optimizer (SGD without momentum keeps none)."""


class ShardOptimizer(torch.optim.Optimizer):
    """``torch.optim.SGD`` or ``torch.optim.AdamW`` over ``head.weight``, updating the rows ``step`` is given.

    With ``sample_update="rows"``, ``step(rows)`` applies weight decay, momentum and the AdamW
    moments to those rows alone (the forward's ``HeadOutput.sampled_rows``; None: every row): an
    unsampled class keeps its weight and its state. AdamW counts steps per row, so a row's bias
    correction uses the number of times that row was updated: a sampled row moves exactly as
    under ``torch.optim.AdamW`` applied to the steps that drew it.

    ``sample_update="shard"`` is insightface's PartialFC_V2: the optimizer over the whole shard,
    where unsampled rows get zero gradient but are still decayed and still move with their
    momentum (AdamW: every row's step count advances). Without sampling both are exactly torch's.

    With several forwards per step (gradient accumulation), pass the union of their sampled rows.
    """

    def __init__(
        self,
        head: ShardedHead,
        lr: float,
        name: OptimizerName = "sgd",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 5e-4,
        sample_update: SampleUpdate = "rows",
    ) -> None:
        check_choice(name, OptimizerName, "optim.name")
        check_choice(sample_update, SampleUpdate, "head.sample_update")
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__([head.weight], defaults)
        self.head = head
        self.name = name
        self.sample_update = sample_update

    def _state_names(self) -> tuple[str, ...]:
        if self.name == "sgd" and not self.param_groups[0]["momentum"]:
            return ()
        return STATE_ROWS[self.name]

    def _follow_the_head(self) -> None:
        """Optimise the head's current weight (the sub-centre drop replaces it), keeping the state already moved
        to it."""
        weight = self.head.weight
        if self.param_groups[0]["params"][0] is not weight:
            old = self.param_groups[0]["params"][0]
            self.param_groups[0]["params"] = [weight]
            self.state[weight] = self.state.pop(old, {})

    @torch.no_grad()
    def keep_centres(self, which: Tensor, sub_centers: int) -> None:
        """After ``head.keep_centres(which)``: keep the state rows of the same centres."""
        old = self.param_groups[0]["params"][0]
        rows = torch.arange(len(which), device=which.device)
        self.state[old] = {key: value.view(len(which), sub_centers, *value.shape[1:])[rows, which].clone()
                           for key, value in self.state.pop(old, {}).items()}
        self._follow_the_head()

    def _shard_state(self) -> dict[str, Tensor]:
        """The per-row state tensors, created as zeros on the first step."""
        weight = self.head.weight
        state = self.state[weight]
        for key in self._state_names():
            if key not in state:
                dtype = torch.long if key == "step" else weight.dtype
                state[key] = torch.zeros(weight.shape[:1] if key == "step" else weight.shape, dtype=dtype,
                                         device=weight.device)
        return state

    @torch.no_grad()
    def step(self, rows: Tensor | None) -> None:  # type: ignore[override]
        """Update the centres of ``rows``, the shard's classes scored this step (sorted local class indices;
        None: every class), or the whole shard with ``sample_update="shard"``."""
        weight = self.head.weight
        if weight.grad is None:
            return
        group = self.param_groups[0]
        state = self._shard_state()
        if rows is None or self.sample_update == "shard":
            self._update(weight, weight.grad, state, group)
            return
        rows = self.head.centre_rows(rows)
        picked = {key: value.index_select(0, rows) for key, value in state.items()}
        rows_weight = weight.index_select(0, rows)
        self._update(rows_weight, weight.grad.index_select(0, rows), picked, group)
        weight.index_copy_(0, rows, rows_weight)
        for key, value in picked.items():
            state[key].index_copy_(0, rows, value)

    def _update(self, weight: Tensor, grad: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        """One step of the optimizer on ``weight`` rows and their ``state``, in place."""
        lr, weight_decay = group["lr"], group["weight_decay"]
        if self.name == "sgd":
            if weight_decay:
                grad = grad.add(weight, alpha=weight_decay)
            if "momentum_buffer" in state:
                grad = state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
            weight.sub_(grad, alpha=lr)
            return
        beta1, beta2 = group["betas"]
        state["step"].add_(1)
        step = state["step"].to(torch.float64).unsqueeze(1)
        weight.mul_(1.0 - lr * weight_decay)
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = (lr / (1.0 - beta1**step)).to(weight.dtype)
        correction2_sqrt = (1.0 - beta2**step).sqrt().to(weight.dtype)
        denom = state["exp_avg_sq"].sqrt().div_(correction2_sqrt).add_(group["eps"])
        weight.sub_(state["exp_avg"] / denom * step_size)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The per-row state with the class range it holds: ``{"name", "class_start", "class_end",
        "rows": {state name: [end - start, ...]}}`` (``rows`` is empty before the first step).
        Hyper-parameters are not stored: they come from the config."""
        return {
            "name": self.name,
            "class_start": self.head.class_start,
            "class_end": self.head.class_end,
            "rows": {key: self.head.by_class(value) for key, value in self.state[self.head.weight].items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a ``state_dict()`` of this shard's class range and optimizer; empty ``rows``: no step yet."""
        head = self.head
        if state_dict["name"] != self.name:
            raise ValueError(f"head optimizer state is {state_dict['name']}'s, the run uses {self.name}")
        saved = (state_dict["class_start"], state_dict["class_end"])
        if saved != head.class_range:
            raise ValueError(f"head optimizer state holds classes [{saved[0]}, {saved[1]}), this shard "
                             f"[{head.class_start}, {head.class_end})")
        self._follow_the_head()
        rows = state_dict["rows"]
        if rows and set(rows) != set(self._state_names()):
            raise ValueError(f"head optimizer state holds {sorted(rows)}, {self.name} here keeps "
                             f"{sorted(self._state_names()) or 'none'}")
        self.state[head.weight] = {}
        state = self._shard_state() if rows else self.state[head.weight]
        for key, value in rows.items():
            expected = head.by_class(state[key]).shape
            if value.shape != expected:
                raise ValueError(f"head optimizer {key} is {tuple(value.shape)}, the shard's {tuple(expected)}")
            state[key].copy_(value.reshape(state[key].shape))
