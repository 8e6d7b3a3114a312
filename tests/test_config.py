"""Config loading: strict types, unknown keys, overrides, and every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest

from sface_dist.config import Config, ConfigError, load_config, save_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


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


def test_overrides_are_typed_and_ints_widen_to_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data: {root: d}\n"), ["train.steps=7", "head.s=30", "eval.bins=[a.bin, b.bin]"])
    assert cfg.train.steps == 7
    assert cfg.head.s == 30.0 and isinstance(cfg.head.s, float)
    assert cfg.eval.bins == ["a.bin", "b.bin"]
    with pytest.raises(ConfigError, match="train.amp: expected str, got int"):
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
