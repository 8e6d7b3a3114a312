"""``train.engine: deepspeed``: what it refuses, in the config and without a process group. Its steps and
checkpoints on real ranks against DDP's are tests/faults/test_deepspeed_ranks.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import pytest

from sface_dist.config import ConfigError, load_config

from deepspeed_setup import cpu_env, make_config


@pytest.mark.parametrize(
    ("override", "key"), [("train.amp=fp16", "train.amp"), ("train.grad_comm=bf16", "train.grad_comm")]
)
def test_deepspeed_refuses_what_it_does_not_run(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(override)}: .*train\.engine=deepspeed"):
        load_config(None, ["data.backend=synthetic", "train.engine=deepspeed", "train.steps=1", override])


def test_deepspeed_missing_names_the_key() -> None:
    with mock.patch("importlib.util.find_spec", return_value=None):
        with pytest.raises(ConfigError, match=r"^--set train\.engine=deepspeed: deepspeed is not installed"):
            load_config(None, ["data.backend=synthetic", "train.engine=deepspeed", "train.steps=1"])


def test_zero_stage_is_one_or_two() -> None:
    with pytest.raises(ConfigError, match=r"^--set deepspeed\.stage=3: expected 1 or 2, got 3$"):
        load_config(None, ["data.backend=synthetic", "deepspeed.stage=3"])


def test_deepspeed_without_a_process_group_names_the_launch(tmp_path: Path) -> None:
    """``python -m sface_dist.train`` without torchrun has no process group for DeepSpeed to join."""
    from sface_dist.training.trainer import Trainer

    with pytest.raises(ValueError, match=r"^train\.engine=deepspeed: needs a process group: launch with torchrun"):
        Trainer(make_config(tmp_path, "zero1"), cpu_env(0, 1))
