"""Checksums: every file a checkpoint, a best backbone or an ONNX export writes has its SHA-256 recorded, and
every reader refuses a damaged file in one line naming it (docs/reliability.md, What cannot be used damaged).

The digests are checked against ``hashlib`` and ``sha256sum`` (independent of the project's writer); the
damage is 64 flipped bytes in the middle of the file, the bit rot or bad copy that still unpickles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sface_dist.checkpoint import CheckpointError, load_trainer_state, read_head_rows
from sface_dist.evaluation.checkpoint_backbone import load_backbone

from training_runs import ROOT, copy_run, step_dir, tool, train_in_process, write_config


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``path`` (its size unchanged)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_checkpoint_file_has_its_digest_in_the_manifest(trained_run: Path) -> None:
    for checkpoint in (step_dir(trained_run, 2), step_dir(trained_run, 4), trained_run / "best" / "heldout"):
        files = json.loads((checkpoint / "manifest.json").read_text())["files"]
        on_disk = sorted(p.name for p in checkpoint.iterdir() if p.name != "manifest.json")
        assert sorted(files) == on_disk
        for name, record in files.items():
            assert record == {"sha256": sha256(checkpoint / name), "bytes": (checkpoint / name).stat().st_size}


def reader_commands(run: Path, data: Path, tmp_path: Path, target: str) -> dict[str, tuple[str, list[str]]]:
    """Each reader of a checkpoint (a tool and its arguments) pointed at ``target``: a step directory or a
    best-backbone folder."""
    return {
        "eval_verification": ("eval_verification", ["--checkpoint", target, "--bin", str(data / "heldout.bin"),
                                                    "--quiet"]),
        "export_onnx": ("export_onnx", ["--checkpoint", target, "--out", str(tmp_path / "model.onnx")]),
        "embed": ("embed", ["--checkpoint", target, "--rec", str(data), "--out", str(tmp_path / "e.npy"),
                            "--quiet"]),
        "find_noisy_labels": ("find_noisy_labels", ["--checkpoint", target, "--out", str(tmp_path / "noise"),
                                                    "--quiet"]),
    }


DAMAGED = {
    "trainer.pt": ("step", "trainer.pt", ["train", "eval_verification", "export_onnx", "embed", "find_noisy_labels",
                                          "bench_head"]),
    "a head shard": ("step", "head-00000000-00000024.pt", ["train", "find_noisy_labels", "bench_head"]),
    "best backbone": ("best", "backbone.pt", ["eval_verification", "export_onnx", "embed"]),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_each_reader_refuses_a_damaged_file_in_one_line(
    trained_run: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    where, name, readers = DAMAGED[case]
    run = copy_run(trained_run, tmp_path / "run")
    folder = step_dir(run) if where == "step" else run / "best" / "heldout"
    damaged = folder / name
    flip_bytes(damaged)
    expected = f"{damaged}: damaged or changed since it was written: sha256 "
    commands = reader_commands(run, demo_data, tmp_path, str(folder))
    for reader in readers:
        if reader == "train":
            status = train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "train.steps=6")
            err = capsys.readouterr().err
            assert status == 1 and err.startswith(f"error: {expected}") and err.count("\n") == 1, err
            assert (run / "checkpoints" / "latest").read_text() == "step-00000004"
        elif reader == "bench_head":
            result = subprocess.run([sys.executable, "tools/bench_head.py", "--device", "cpu", "--live-pairs",
                                     str(folder), "--rows", "16"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 1 and result.stderr.startswith(f"error: {expected}"), result.stderr
        else:
            module, argv = commands[reader]
            status = tool(module).main(argv)
            err = capsys.readouterr().err
            assert status == 1 and f"error: {expected}" in err and "Traceback" not in err, (reader, err)
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "e.npy").exists()


def test_a_checkpoint_without_digests_loads_with_one_line(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint of the format before digests (its manifest has no ``files``) still loads, said once."""
    run = copy_run(trained_run, tmp_path / "run")
    checkpoint = step_dir(run)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["files"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert load_trainer_state(checkpoint)["step"] == 4
    assert read_head_rows(checkpoint).shape == (24, 32)
    assert load_backbone(checkpoint).step == 4
    assert capsys.readouterr().out == (
        f"warning: {checkpoint}: written before checkpoints recorded checksums: its files are read unverified\n"
    )


def test_a_file_the_manifest_does_not_name_is_refused(trained_run: Path, tmp_path: Path) -> None:
    """A head file slipped into a checkpoint under a listed name of another: its record is not its own."""
    run = copy_run(trained_run, tmp_path / "run")
    checkpoint = step_dir(run)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["files"]["trainer.pt"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"trainer\.pt: its manifest records no checksum for it: refused$"):
        load_trainer_state(checkpoint)


def test_an_onnx_export_carries_a_sha256sum_file_the_tools_check(
    trained_run: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.onnx"
    assert tool("export_onnx").main(["--checkpoint", str(trained_run), "--out", str(model)]) == 0
    checked = subprocess.run(["sha256sum", "-c", "model.onnx.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout == "model.onnx: OK\n", checked
    evaluate = ["--onnx", str(model), "--bin", str(demo_data / "heldout.bin"), "--quiet"]
    capsys.readouterr()
    assert tool("eval_verification").main(evaluate) == 0
    assert "warning" not in capsys.readouterr().out
    shutil.copy(model, tmp_path / "copy.onnx")
    assert tool("eval_verification").main(["--onnx", str(tmp_path / "copy.onnx"), *evaluate[2:]]) == 0
    assert f"warning: {tmp_path / 'copy.onnx'}: no copy.onnx.sha256 beside it: read unverified\n" in (
        capsys.readouterr().out)
    flip_bytes(model)
    assert tool("eval_verification").main(evaluate) == 1
    assert capsys.readouterr().err.startswith(f"error: {model}: damaged or changed since it was written: sha256 ")
