"""The backbone's data-parallel engine: DDP, or DeepSpeed ZeRO stage 1/2 (``train.engine``).

Both keep the sharding invariant: a rank's backbone gradient is its rows' share of the global-batch gradient,
and the ranks' shares are *summed* (docs/design.md, Sharding). The loop drives either through the same calls
(``accumulate``, ``backward``, ``clip_grad_norm``, ``step``, ``discard_gradients``) and saves and restores it in
the project's checkpoint format (``state_dict``, ``load_state_dict``): the backbone's state dict and a
torch-optimizer ``state_dict``, whatever engine and world size wrote it. The head stays outside the engine,
with its own optimizer (``optimization.Optimization``).

``load_state_dict`` raises ``ValueError`` with one line when the checkpoint's backbone does not fit the
config (``checkpoint.state_dict_mismatch``) or its optimizer state does not fit the parameters.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sface_dist.checkpoint import state_dict_mismatch
from sface_dist.config import DeepSpeedConfig, Engine, TrainConfig, check_choice
from sface_dist.parallel.data_parallel import data_parallel
from sface_dist.parallel.launch import DistEnv


class BackboneEngine(Protocol):
    """What the loop and ``Optimization`` call on the backbone, whichever engine runs it."""

    model: nn.Module
    """The module the loop calls forward on (DDP or the DeepSpeed engine around the backbone)."""

    def accumulate(self, last: bool) -> AbstractContextManager[None]:
        """The context of one micro-step's forward and backward; ``last``: the optimizer step's final one."""
        ...

    def backward(self, loss: Tensor) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Clip the summed backbone gradient to ``max_norm`` (0: no clipping); its norm before clipping, on the
        device."""
        ...

    def step(self) -> None: ...

    def discard_gradients(self) -> None:
        """Drop this step's gradients without changing the weights (a skipped non-finite step)."""
        ...

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """Load the backbone's weights alone (a pretrained backbone at the start of a run); ``ValueError`` (one
        line) when they do not fit."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Collective under DeepSpeed: ``{"backbone": its fp32 state dict, "backbone_optimizer": the optimizer's
        whole state as the torch optimizer's ``state_dict`` lays it out}``, whatever engine and world size."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of any engine and world size; ``ValueError`` (one line) when it does not fit."""
        ...


def check_optimizer_state(groups: list[list[Tensor]], state: Any) -> None:
    """One line when a torch-optimizer ``state_dict`` does not fit the parameter ``groups``: not such a dict, an
    entry naming no parameter, or a per-parameter tensor of another shape than its parameter's (which would load
    and fail only at the first step)."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or not isinstance(
            state.get("param_groups"), list):
        raise ValueError("not a torch optimizer state_dict (expected 'state' and 'param_groups')")
    params = [param for group in groups for param in group]
    for index, entry in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise ValueError(f"state entry {index!r} names none of the {len(params)} parameters")
        shape = params[index].shape
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != shape:
                raise ValueError(f"{key} of parameter {index} has shape {list(value.shape)}, the parameter "
                                 f"{list(shape)}")


def load_backbone(backbone: nn.Module, weights: dict[str, Tensor]) -> None:
    """``backbone.load_state_dict`` with torch's list of mismatches cut to one line."""
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"the backbone does not fit the config: {state_dict_mismatch(error)}") from None


def optimizer_state_error(error: Exception) -> ValueError:
    return ValueError(f"the backbone optimizer state does not fit: {error}")


class DDPEngine:
    """The backbone stepped by its torch optimizer through the loss scaler (fp16 autocast); ``model`` is the
    backbone in DDP with summed gradients (``parallel.data_parallel``), or the backbone itself in one process."""

    def __init__(
        self, backbone: nn.Module, optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler, model: nn.Module
    ) -> None:
        self.backbone, self.optimizer, self.grad_scaler, self.model = backbone, optimizer, grad_scaler, model

    def accumulate(self, last: bool) -> AbstractContextManager[None]:
        """DDP's gradient sum on the last micro-step only; the others accumulate locally."""
        if last or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: Tensor) -> None:
        self.grad_scaler.scale(loss).backward()

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        self.grad_scaler.unscale_(self.optimizer)
        if max_norm > 0:
            return nn.utils.clip_grad_norm_(self.backbone.parameters(), max_norm)
        return nn.utils.get_total_norm([p.grad for p in self.backbone.parameters() if p.grad is not None])

    def step(self) -> None:
        self.grad_scaler.step(self.optimizer)

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        load_backbone(self.backbone, weights)

    def state_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.state_dict(), "backbone_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_weights(state["backbone"])
        try:
            check_optimizer_state([group["params"] for group in self.optimizer.param_groups],
                                  state["backbone_optimizer"])
            self.optimizer.load_state_dict(state["backbone_optimizer"])
        except (ValueError, KeyError) as error:
            raise optimizer_state_error(error) from None


def _skip_shm_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory collective op (``ShareMemCommBuilder``, 60-100 s on a fresh
    machine) when its communication backend starts; the gloo process group the run already has does without it.
    ``deepspeed.comm.torch.build_shm_op`` is replaced before ``deepspeed.initialize`` so that start-up stays fast.
    (``sys.modules`` because ``import deepspeed.comm.torch as m`` binds the ``torch`` that package imported.)"""
    import deepspeed.comm.torch  # noqa: F401 - registers the module in sys.modules

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


class _SumAcrossRanks(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by the data-parallel world size, so that
    DeepSpeed's averaging of the backbone gradient (a division by that size) yields the sum."""

    @staticmethod
    def forward(ctx: Any, embeddings: Tensor, world_size: int) -> Tensor:
        ctx.world_size = world_size
        return embeddings.view_as(embeddings)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.world_size, None


class _SummedForward(nn.Module):
    """The DeepSpeed engine's forward followed by ``_SumAcrossRanks``."""

    def __init__(self, engine: nn.Module, world_size: int) -> None:
        super().__init__()
        self.engine, self.world_size = engine, world_size

    def forward(self, images: Tensor) -> Tensor:
        return _SumAcrossRanks.apply(self.engine(images), self.world_size)


def deepspeed_json(cfg: DeepSpeedConfig, micro_batch: int, grad_accum: int, world_size: int,
                   grad_clip: float) -> dict[str, Any]:
    """The configuration DeepSpeed expects, from the ``deepspeed`` section and the loop's settings."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": cfg.stage,
            "reduce_bucket_size": cfg.bucket_size,
            "allgather_bucket_size": cfg.bucket_size,
            "overlap_comm": cfg.overlap_comm,
            "round_robin_gradients": False,
        },
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """The backbone under DeepSpeed ZeRO stage 1 (optimizer state partitioned) or 2 (and the gradients).

    The torch optimizer is handed to DeepSpeed, which keeps it stepping this rank's flat partition; its
    ``param_groups`` stay the ones ``Optimization``'s ``LambdaLR`` sets the learning rate on. Gradient clipping is
    DeepSpeed's (the same rule as ``clip_grad_norm_``), accumulation boundaries are set by the loop's micro-steps,
    and the loss is already divided by the micro-step count. Weights stay fp32 (``train.amp: bf16`` autocasts the
    forward, as under DDP).
    """

    def __init__(self, backbone: nn.Module, optimizer: torch.optim.Optimizer, cfg: DeepSpeedConfig, env: DistEnv,
                 micro_batch: int, grad_accum: int, grad_clip: float) -> None:
        if not dist.is_initialized():
            raise ValueError("train.engine=deepspeed: needs a process group: launch with torchrun, even for one rank")
        _skip_shm_op()
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed asks for it; srun does not set it
        # DeepSpeed's ZeRO all-gathers through a torch function that warns of its deprecation on every step.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        import deepspeed

        self.backbone, self.optimizer, self.world_size = backbone, optimizer, dist.get_world_size()
        self.group_params = [list(group["params"]) for group in optimizer.param_groups]
        """The torch optimizer's groups as built (DeepSpeed replaces their parameters by its flat partitions)."""
        config = deepspeed_json(cfg, micro_batch, grad_accum, self.world_size, grad_clip)
        self.engine, self.zero, _, _ = deepspeed.initialize(model=backbone, optimizer=optimizer, config=config)
        self.model = _SummedForward(self.engine, self.world_size)

    def accumulate(self, last: bool) -> AbstractContextManager[None]:
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """The summed gradient's norm over every rank's partition; DeepSpeed clips it inside ``step``."""
        return self.zero.scaled_global_norm()

    def step(self) -> None:
        self.engine.step()

    def discard_gradients(self) -> None:
        """Without ``step``: the reduced partitions are replaced at the next accumulation boundary, and the ZeRO
        optimizer drops the gradients it still holds on the parameters."""
        self.zero.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.state_dict(), "backbone_optimizer": self._optimizer_state_dict()}

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """Into the model and DeepSpeed's fp32 master partitions."""
        load_backbone(self.backbone, weights)
        self.zero.refresh_fp32_params()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_weights(state["backbone"])
        try:
            self._load_optimizer_state(state["backbone_optimizer"])
        except (ValueError, KeyError) as error:
            raise optimizer_state_error(error) from None

    def _groups(self) -> list[tuple[Tensor, list[tuple[int, nn.Parameter, int]]]]:
        """Per parameter group: this rank's flat fp32 partition, and for each parameter DeepSpeed holds in it (the
        trainable ones), its place in the torch optimizer's group, the parameter and its offset in the flat
        group."""
        zero = self.zero
        groups = []
        for partition, params, offsets, original in zip(zero.single_partition_of_fp32_groups,
                                                        zero.round_robin_bit16_groups, zero.round_robin_bit16_offsets,
                                                        self.group_params, strict=True):
            place = {id(param): i for i, param in enumerate(original)}
            groups.append((partition, [(place[id(p)], p, offset) for p, offset in zip(params, offsets, strict=True)]))
        return groups

    def _optimizer_state_dict(self) -> dict[str, Any]:
        """Collective: every rank's partition of the optimizer state gathered and cut back into per-parameter
        tensors, indexed like ``torch.optim.Optimizer.state_dict`` (frozen parameters hold no state there either)."""
        state: dict[int, dict[str, Any]] = {}
        param_groups = []
        index = 0
        for (partition, members), group, original in zip(self._groups(), self.optimizer.param_groups,
                                                         self.group_params, strict=True):
            saved = self.optimizer.state.get(partition, {})
            flat = {key: self._gather(value) for key, value in saved.items() if _is_flat(value, partition)}
            scalars = {key: value.clone() for key, value in saved.items() if not _is_flat(value, partition)}
            for place, param, offset in members if saved else []:
                tensors = {key: value[offset : offset + param.numel()].view_as(param).clone()
                           for key, value in flat.items()}
                state[index + place] = {**tensors, **scalars}
            ids = list(range(index, index + len(original)))
            param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
            index += len(original)
        return {"state": dict(sorted(state.items())), "param_groups": param_groups}

    def _gather(self, partition: Tensor) -> Tensor:
        parts = [torch.empty_like(partition) for _ in range(self.world_size)]
        dist.all_gather(parts, partition.contiguous())
        return torch.cat(parts)

    def _load_optimizer_state(self, optimizer_state: dict[str, Any]) -> None:
        """This rank's partition of a torch-optimizer ``state_dict`` (the weights already loaded into the model
        and the fp32 master partitions)."""
        check_optimizer_state(self.group_params, optimizer_state)
        groups = optimizer_state["param_groups"]
        if len(groups) != len(self.group_params):
            raise ValueError(f"{len(groups)} parameter groups saved, {len(self.group_params)} configured")
        saved_state = optimizer_state["state"]
        rank = dist.get_rank()
        for (partition, members), group, original in zip(self._groups(), groups, self.group_params, strict=True):
            if len(group["params"]) != len(original):
                raise ValueError(f"a group of {len(group['params'])} parameters saved, {len(original)} configured")
            entries = [saved_state.get(group["params"][place]) for place, _, _ in members]
            if not all(entries):
                continue
            restored: dict[str, Any] = {}
            first_param = members[0][1]
            for key, value in entries[0].items():
                if not (torch.is_tensor(value) and value.shape == first_param.shape):
                    restored[key] = value.clone() if torch.is_tensor(value) else value
                    continue
                flat = partition.new_zeros(partition.numel() * self.world_size)
                for entry, (_, param, offset) in zip(entries, members, strict=True):
                    flat[offset : offset + param.numel()] = entry[key].reshape(-1).to(flat)
                restored[key] = flat.narrow(0, rank * partition.numel(), partition.numel()).clone()
            self.optimizer.state[partition] = restored


def _is_flat(value: Any, partition: Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == partition.shape


def build_engine(
    cfg: TrainConfig,
    deepspeed: DeepSpeedConfig,
    backbone: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_scaler: torch.amp.GradScaler,
    env: DistEnv,
    micro_batch: int,
    grad_clip: float,
) -> BackboneEngine:
    """``train.engine``'s engine around ``backbone`` and its torch ``optimizer``; ``micro_batch``: this rank's
    images per micro-step (``data.batch_size``), ``grad_clip``: ``optim.grad_clip`` (DeepSpeed clips itself)."""
    check_choice(cfg.engine, Engine, "train.engine")
    if cfg.engine == "deepspeed":
        return DeepSpeedEngine(backbone, optimizer, deepspeed, env, micro_batch, cfg.grad_accum, grad_clip)
    return DDPEngine(backbone, optimizer, grad_scaler, data_parallel(backbone, env, grad_comm=cfg.grad_comm))
