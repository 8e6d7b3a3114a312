"""``train.profile``: the chosen steps, and only they, in a Chrome trace under the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sface_dist.config import ConfigError, load_config
from sface_dist.training.trainer import Trainer

from synthetic_trainer import ENV, make_config


def traced_steps(path: Path) -> set[str]:
    events = json.loads(path.read_text())["traceEvents"]
    return {event["name"] for event in events if event.get("name", "").startswith("step ")}


def test_the_chosen_steps_are_traced_and_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = Trainer(make_config(tmp_path / "run", steps=4, profile=[2, 3]), ENV)
    try:
        trainer.fit()
    finally:
        trainer.close()
    path = tmp_path / "run" / "profile" / "rank0.steps2-3.pt.trace.json"
    assert traced_steps(path) == {"step 2", "step 3"}
    events = json.loads(path.read_text())["traceEvents"]
    assert any(event.get("name") == "aten::convolution" for event in events)  # the operators inside the steps
    assert f"profile of steps 2-3: {path} (one file per rank" in capsys.readouterr().out
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left beside it


def test_a_run_stopped_inside_the_range_writes_nothing(tmp_path: Path) -> None:
    trainer = Trainer(make_config(tmp_path / "run", steps=2, profile=[2, 5]), ENV)
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert not (tmp_path / "run" / "profile").exists()


@pytest.mark.parametrize(("value", "problem"), [
    ("[3, 2]", "expected [first, last] optimizer steps, 1 <= first <= last, got [3, 2]"),
    ("[0, 1]", "expected [first, last] optimizer steps, 1 <= first <= last, got [0, 1]"),
    ("[4]", "expected [first, last] optimizer steps, 1 <= first <= last, got [4]"),
    ("[1.5, 2]", "[0]: expected int, got float 1.5"),
])
def test_a_range_that_is_no_steps_is_one_line(tmp_path: Path, value: str, problem: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data: {backend: synthetic, num_classes: 6}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config, [f"train.profile={value}"])
    assert str(raised.value) == f"--set train.profile={value}{'' if problem.startswith('[') else ': '}{problem}"
