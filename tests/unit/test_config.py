"""Config loading: strict types, choices, unknown keys, overrides, every shipped config, and the generated
reference docs/configuration.md."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from sface_dist.config import (
    Config,
    ConfigError,
    SampleCorrection,
    SampleCorrectionOrAuto,
    choices,
    load_config,
    save_config,
)
from sface_dist.config_reference import REGENERATE, ConfigReferenceError, field_docs, render

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_wrong_type_names_file_key_and_type(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  root: d\ntrain:\n  steps: many\n")
    with pytest.raises(ConfigError, match=rf"{path}: train.steps: expected int, got str 'many'"):
        load_config(path)


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  root: d\ntrain:\n  stesp: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.stesp' \(known: .*steps"):
        load_config(path)


@pytest.mark.parametrize(("override", "unknown"), [("trian.steps=2", "trian"), ("train.stpes=2", "train.stpes")])
def test_a_typo_in_an_override_is_named_as_the_command_lines(tmp_path: Path, override: str, unknown: str) -> None:
    """The file is innocent: the line names the ``--set`` as written."""
    path = write(tmp_path, "data:\n  root: d\n")
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(override)}: unknown key '{unknown}' \(known: "):
        load_config(path, [override])
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: unknown key 'trian' \(known: "):
        load_config(write(tmp_path, "data:\n  root: d\ntrian: {}\n"), ["train.steps=2"])


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(write(tmp_path, "trian: {}\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_choice_and_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="head.impl: expected one of"):
        load_config(write(tmp_path, "data: {root: d}\nhead: {impl: fast}\n"))
    with pytest.raises(ConfigError, match="data.batch_size: must be > 0"):
        load_config(write(tmp_path, "data: {root: d, batch_size: 0}\n"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.schedule=step", r"optim.milestones: required by optim.schedule=step"),
        ("optim.milestones=[0, 10]", r"optim.milestones: must be increasing and > 0, got \[0.0, 10.0\]"),
        ("optim.milestones=[10, 5]", r"optim.milestones: must be increasing and > 0, got \[10.0, 5.0\]"),
        ("optim.milestones=[5, 5]", r"optim.milestones: must be increasing and > 0"),
        ("train.grad_accum=0", r"train.grad_accum: must be > 0, got 0"),
        ("train.max_nonfinite=0", r"train.max_nonfinite: must be > 0, got 0"),
        ("optim.decay_factor=0", r"optim.decay_factor: must be in \(0, 1\], got 0.0"),
        ("optim.decay_factor=1.5", r"optim.decay_factor: must be in \(0, 1\], got 1.5"),
        ("optim.head_lr_scale=0", r"optim.head_lr_scale: must be > 0, got 0.0"),
    ],
)
def test_loop_settings_out_of_range_name_their_key(tmp_path: Path, override: str, message: str) -> None:
    """Named by the override that set the key, or by the file and the key when the file (or its default) set it."""
    key, problem = message.split(": ", 1)
    where = f"--set {re.escape(override)}" if override.startswith(f"{key}=") else (
        f"{re.escape(str(tmp_path / 'run.yaml'))}: {key}")
    with pytest.raises(ConfigError, match=f"^{where}: {problem}"):
        load_config(write(tmp_path, "data: {root: d}\n"), [override])


def test_cleaning_takes_one_rule_for_every_cleaning_or_one_per_cleaning(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {root: d}\ntrain: {steps: 10}\nclean: {at_epochs: [2, 6]}\n")
    assert [load_config(path).clean.rule_after(epoch) for epoch in (2, 6)] == ["outlier", "outlier"]
    each = load_config(path, ["clean.rule=[outlier, finder]"])
    assert [each.clean.rule_after(epoch) for epoch in (2, 6)] == ["outlier", "finder"]
    with pytest.raises(ConfigError, match=r"^--set clean.rule=\[finder\]: one rule for every cleaning, or one per "
                       r"clean.at_epochs entry \(2\), got 1: \['finder'\]$"):
        load_config(path, ["clean.rule=[finder]"])
    with pytest.raises(ConfigError, match=r"^--set clean.rule=bogus: expected one of 'outlier', 'finder' or a list of "
                       r"\(one of 'outlier', 'finder'\), got str 'bogus'$"):
        load_config(path, ["clean.rule=bogus"])


def test_step_schedule_with_increasing_milestones_and_full_decay_range_loads(tmp_path: Path) -> None:
    overrides = ["optim.schedule=step", "optim.milestones=[2.5, 10]", "optim.decay_factor=1", "train.grad_accum=1"]
    cfg = load_config(write(tmp_path, "data: {root: d}\n"), overrides)
    assert cfg.optim.milestones == [2.5, 10.0] and cfg.optim.decay_factor == 1.0


def test_overrides_are_typed_and_ints_widen_to_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data: {root: d}\n"), ["train.steps=7", "head.s=30", "eval.bins=[a.bin, b.bin]"])
    assert cfg.train.steps == 7
    assert cfg.head.s == 30.0 and isinstance(cfg.head.s, float)
    assert cfg.eval.bins == ["a.bin", "b.bin"]
    with pytest.raises(ConfigError, match=r"^--set train\.amp=3: expected str, got int"):
        load_config(write(tmp_path, "data: {root: d}\n"), ["train.amp=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(write(tmp_path, "data: {root: d}\n"), ["train.steps"])


def test_saved_config_loads_back_equal(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data: {root: d}\nhead: {a: 0.9}\n"))
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def literal_fields() -> list[tuple[str, Any]]:
    """(dotted key, annotation) of every config field whose annotation is a Literal."""
    found = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is Literal:
                found.append((f"{section.name}.{name}", tp))
    return found


@pytest.mark.parametrize("key, literal", literal_fields(), ids=[key for key, _ in literal_fields()])
def test_choice_fields_accept_their_choices_only(key: str, literal: Any) -> None:
    section, name = key.split(".")
    base = ["data.root=d", "optim.milestones=[1]"]  # what optim.schedule=step needs besides itself
    for value in typing.get_args(literal):
        assert getattr(getattr(load_config(None, [*base, f"{key}={value}"]), section), name) == value
    listed = ", ".join(typing.get_args(literal))
    with pytest.raises(ConfigError, match=rf"^--set {key}=bogus: expected one of {listed}, got 'bogus'$"):
        load_config(None, [*base, f"{key}=bogus"])


def test_sample_correction_setting_is_the_heads_choices_plus_auto() -> None:
    assert choices(SampleCorrectionOrAuto) == ("auto", *choices(SampleCorrection))
    assert "auto" not in choices(SampleCorrection)


def test_reference_on_disk_is_the_generated_one() -> None:
    on_disk = (ROOT / "docs" / "configuration.md").read_text()
    assert on_disk == render(), f"docs/configuration.md is out of date: run `{REGENERATE}` from the repository root"


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(Config)])
def test_every_field_has_a_docstring(section: str) -> None:
    cls = typing.get_type_hints(Config)[section]
    docs = field_docs(cls)
    assert list(docs) == [f.name for f in dataclasses.fields(cls)]
    assert all(doc.strip() for doc in docs.values())


def test_a_field_without_docstring_is_refused() -> None:
    @dataclasses.dataclass
    class Planted:
        documented: int = 1
        """Has one."""
        bare: int = 2
        also_documented: str = ""
        """Has one too."""

    with pytest.raises(ConfigReferenceError, match=r"test_config\.py: Planted: no docstring after field\(s\) bare$"):
        field_docs(Planted)


def test_reference_lists_exactly_each_literals_choices() -> None:
    rows = {}
    for line in render().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if len(cells) == 4 and cells[0].startswith("`") and "." in cells[0]:
            rows[cells[0].strip("`")] = cells[1]
    for key, literal in literal_fields():
        assert re.findall(r"`([^`]+)`", rows[key]) == list(typing.get_args(literal)), key
    assert rows["head.s"] == "float" and rows["eval.bins"] == "list[str]"
