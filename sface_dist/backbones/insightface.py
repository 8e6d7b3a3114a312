"""insightface's arcface_torch backbones: which of the project's models a state dict of theirs is.

The project's ``iresnet*`` and ``mobilefacenet`` carry arcface_torch's parameter names and shapes
(``get_model("r18" ... "r200")`` and ``get_model("mbf")``), so their weights load as they are; what a file does not
say is which architecture and embedding size wrote it. ``identify`` reads both from the names and shapes;
``checked_state`` refuses, in one line naming the first names that differ, a state dict that is not exactly that
model's. arcface_torch saves the backbone's state dict itself (``model.pt``, the released ``backbone.pth``) or
inside its training checkpoint (``checkpoint_gpu_N.pt``, under ``state_dict_backbone``); ``backbone_state`` takes
either, with the ``module.`` prefix of a ``DataParallel`` wrapper dropped.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from sface_dist.backbones.iresnet import IRESNET_LAYERS

INSIGHTFACE_NAMES = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100",
                     "r200": "iresnet200", "mbf": "mobilefacenet"}
"""arcface_torch's ``network`` names and the project's backbone of the same architecture."""
CHECKPOINT_KEY = "state_dict_backbone"
"""Where arcface_torch's training checkpoint keeps the backbone."""
SHOWN = 3
"""Names of each kind a mismatch line shows."""


def backbone_state(saved: Any, source: str) -> dict[str, Tensor]:
    """The backbone state dict in ``saved`` (what ``torch.load`` read from ``source``)."""
    if isinstance(saved, dict) and isinstance(saved.get(CHECKPOINT_KEY), dict):
        saved = saved[CHECKPOINT_KEY]
    if not isinstance(saved, dict) or not saved or not all(
            isinstance(key, str) and isinstance(value, Tensor) for key, value in saved.items()):
        raise ValueError(f"{source}: not a backbone state dict (names to tensors), nor arcface_torch's checkpoint "
                         f"holding one under {CHECKPOINT_KEY!r}")
    if all(key.startswith("module.") for key in saved):
        saved = {key.removeprefix("module."): value for key, value in saved.items()}
    return saved


def _blocks_per_stage(state: dict[str, Tensor]) -> tuple[int, ...]:
    """The residual blocks of each of an iresnet's four stages (``layerS.B.*`` names)."""
    counts = []
    for stage in range(1, 5):
        indices = {int(match[1]) for key in state if (match := re.match(rf"layer{stage}\.(\d+)\.", key))}
        counts.append(max(indices) + 1 if indices else 0)
    return tuple(counts)


def identify(state: dict[str, Tensor], source: str) -> tuple[str, int]:
    """(the project's backbone name, embedding size) of arcface_torch's state dict ``state``."""
    if "conv1.weight" in state and "fc.weight" in state and state["fc.weight"].dim() == 2:
        stages = _blocks_per_stage(state)
        name = next((name for name, layers in IRESNET_LAYERS.items() if layers == stages), None)
        if name is None:
            known = ", ".join(f"{name} {layers}" for name, layers in IRESNET_LAYERS.items())
            raise ValueError(f"{source}: an iresnet of {stages} blocks per stage, which is none of {known}")
        return name, int(state["fc.weight"].shape[0])
    linear = state.get("features.layers.2.weight")
    if "conv_sep.layers.0.weight" in state and linear is not None and linear.dim() == 2:
        return "mobilefacenet", int(linear.shape[0])
    first = ", ".join(list(state)[:SHOWN])
    raise ValueError(f"{source}: not an arcface_torch iresnet (r18-r200) or mobilefacenet (mbf) state dict "
                     f"(its first names: {first})")


def checked_state(model: nn.Module, state: dict[str, Tensor], description: str, source: str) -> dict[str, Tensor]:
    """``state`` when it holds exactly ``model``'s names at its shapes; else one line naming the first that differ
    (``description``: the model, as the user would name it)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [f"{key} is {list(state[key].shape)}, expected {list(tensor.shape)}"
                for key, tensor in expected.items() if key in state and state[key].shape != tensor.shape]
    problems = []
    for kind, names in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped)):
        if names:
            more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            problems.append(f"{kind}: {', '.join(names[:SHOWN])}{more}")
    if problems:
        raise ValueError(f"{source}: does not fit {description}: {'; '.join(problems)}")
    return state
