"""``sface_dist.atomic_write``: the old content or the whole new one, synced, and nothing left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from torch import nn

from sface_dist.atomic_write import (
    atomic_files,
    atomic_folder,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    publish_file,
    replace_folder,
    temporary_sibling,
)
from sface_dist.checkpoint import save_backbone


class Interrupted(Exception):
    pass


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """``(inode, is a folder)`` of every file descriptor ``os.fsync`` is called on."""
    calls: list[tuple[int, bool]] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        status = os.fstat(fd)
        calls.append((status.st_ino, stat.S_ISDIR(status.st_mode)))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_write_replaces_the_file_and_syncs_it_and_its_folder(tmp_path: Path, synced: list[tuple[int, bool]]) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    atomic_write_text(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü" and names(tmp_path) == ["state.json"]
    assert synced == [(path.stat().st_ino, False), (tmp_path.stat().st_ino, True)]
    atomic_write_bytes(tmp_path / "raw", b"\x00\x01")
    assert (tmp_path / "raw").read_bytes() == b"\x00\x01"


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, synced: list[tuple[int, bool]]
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    with pytest.raises(Interrupted):
        with atomic_open(path) as handle:
            handle.write(b"half of the new")
            assert temporary_sibling(path).exists()
            raise Interrupted
    assert path.read_bytes() == b"old" and names(tmp_path) == ["model.pt"]
    assert synced == []


def test_a_failing_rename_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "train.idx"
    path.write_text("old")

    def failing_replace(source: object, target: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError, match="read-only"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and names(tmp_path) == ["train.idx"]


def test_a_link_at_the_target_is_replaced_and_one_at_the_temporary_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").symlink_to(victim)
    temporary_sibling(run / "latest").symlink_to(victim)
    atomic_write_text(run / "config.yaml", "a")
    atomic_write_text(run / "latest", "b")
    assert victim.read_text() == "precious"
    assert not (run / "config.yaml").is_symlink() and (run / "config.yaml").read_text() == "a"
    assert (run / "latest").read_text() == "b" and names(run) == ["config.yaml", "latest"]


def test_a_written_file_gets_the_mode_open_gives(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "atomic", b"x")
    (tmp_path / "opened").write_bytes(b"x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "opened").stat().st_mode


def test_publish_file_syncs_the_file_then_the_folder(tmp_path: Path, synced: list[tuple[int, bool]]) -> None:
    path = tmp_path / "model.onnx"
    temporary = temporary_sibling(path)
    temporary.write_bytes(b"onnx")
    publish_file(temporary, path)
    assert path.read_bytes() == b"onnx" and names(tmp_path) == ["model.onnx"]
    assert synced == [(path.stat().st_ino, False), (tmp_path.stat().st_ino, True)]


def test_atomic_files_publish_what_was_written_and_only_on_success(
    tmp_path: Path, synced: list[tuple[int, bool]]
) -> None:
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "train.rec").write_text("old rec")
    (out / "classes.txt").write_text("old classes")
    with pytest.raises(Interrupted):
        with atomic_files(out, ["train.rec", "classes.txt"]) as files:
            files["train.rec"].write_text("new rec")
            raise Interrupted
    assert (out / "train.rec").read_text() == "old rec" and names(out) == ["classes.txt", "train.rec"]
    assert synced == []
    with atomic_files(out, ["train.rec", "classes.txt", "property"]) as files:
        files["train.rec"].write_text("new rec")
        files["property"].write_text("3,112,112\n")
    assert [(out / name).read_text() for name in ("train.rec", "classes.txt", "property")] == [
        "new rec", "old classes", "3,112,112\n"]
    assert names(out) == ["classes.txt", "property", "train.rec"]
    assert sorted(synced) == sorted([(out.stat().st_ino, True), ((out / "train.rec").stat().st_ino, False),
                                     ((out / "property").stat().st_ino, False)])


def test_an_atomic_folder_replaces_the_old_one_whole(tmp_path: Path, synced: list[tuple[int, bool]]) -> None:
    folder = tmp_path / "best" / "lfw"
    with atomic_folder(folder) as staging:
        (staging / "backbone.pt").write_bytes(b"first")
    assert names(folder) == ["backbone.pt"] and names(tmp_path / "best") == ["lfw"]
    assert (folder.stat().st_ino, True) in synced and ((tmp_path / "best").stat().st_ino, True) in synced
    with atomic_folder(folder) as staging:
        (staging / "manifest.json").write_text("{}")
    assert names(folder) == ["manifest.json"] and names(tmp_path / "best") == ["lfw"]


def test_an_interrupted_atomic_folder_keeps_the_old_one_and_leaves_no_staging(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "0.jpg").write_bytes(b"old")
    with pytest.raises(Interrupted):
        with atomic_folder(folder) as staging:
            (staging / "1.jpg").write_bytes(b"new")
            raise Interrupted
    assert names(tmp_path) == ["images"] and names(folder) == ["0.jpg"]


def test_replace_folder_retires_the_old_folder_and_removes_it(tmp_path: Path) -> None:
    staging, target, retired = tmp_path / "step-2.tmp", tmp_path / "step-2", tmp_path / "step-2.old"
    staging.mkdir()
    (staging / "new").write_text("n")
    target.mkdir()
    (target / "old").write_text("o")
    retired.mkdir()  # a crash's leftover
    replace_folder(staging, target, retired)
    assert names(tmp_path) == ["step-2"] and names(target) == ["new"]


def test_a_best_backbone_folder_is_synced_whole(tmp_path: Path, synced: list[tuple[int, bool]]) -> None:
    """Its files, its folder and the parent the folder is renamed in, as a checkpoint's."""
    best = tmp_path / "best" / "lfw"
    for step in (1, 2):
        synced.clear()
        save_backbone(best, nn.Linear(2, 2), {"step": step, "config": {}})
        expected = {(path.stat().st_ino, path.is_dir()) for path in (best / "backbone.pt", best / "manifest.json",
                                                                      best, tmp_path / "best")}
        assert expected <= set(synced)
        assert names(tmp_path / "best") == ["lfw"] and names(best) == ["backbone.pt", "manifest.json"]
