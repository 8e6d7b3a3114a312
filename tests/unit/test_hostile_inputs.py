"""Hostile inputs, round two: nothing written outside where the user pointed, nothing of theirs deleted, no hang,
bounded memory, one line per mistake (docs/reliability.md). Those that need a launch or a signal are
tests/faults/test_hostile_launches.py.

Grouped by surface: the run folder, the config, the data tools, checkpoints, evaluation, the tools. Each case
asserts the exact line, the exit status, and that nothing outside the target changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from sface_dist.checkpoint import CheckpointError, load_trainer_state
from sface_dist.config import ConfigError, load_config
from sface_dist.data.bin_pack import VerificationPackError, read_bin, write_bin
from sface_dist.data.images import encode_jpeg
from sface_dist.evaluation.checkpoint_backbone import load_backbone
from sface_dist.evaluation.ijb import IjbError, read_ijb
from sface_dist.evaluation.monitor import VerificationMonitor
from sface_dist.file_digest import file_record

from ijb_sets import make_ijb_set
from synthetic_trainer import ENV
from training_runs import ROOT, one_error_line, tool, train_in_process, write_config


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes, links as links: what must not change."""
    return {str(path.relative_to(folder)): (os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_symlink() or path.is_file()}


# The run folder


@pytest.mark.parametrize("name", [".lock", "history.jsonl"])
def test_a_link_in_the_run_folder_is_refused_and_its_target_untouched(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    capsys.readouterr()
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "eval.bins=[]") == 1
    what = "the lock is written to" if name == ".lock" else "the run's history is appended to"
    assert one_error_line(capsys.readouterr().err) == (
        f"error: train.output {run}: {run / name} is a symbolic link: refused ({what}; remove the link)")
    assert victim.read_text() == "precious\n" and (run / name).is_symlink()


def test_a_link_named_config_yaml_is_replaced_not_followed(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").symlink_to(victim)
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "eval.bins=[]") == 0
    assert victim.read_text() == "precious\n"
    assert not (run / "config.yaml").is_symlink() and "backbone: tiny" in (run / "config.yaml").read_text()


def test_a_fifo_named_lock_is_one_line_naming_it(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ".lock")
    capsys.readouterr()
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "eval.bins=[]") == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: train.output {run}: {run / '.lock'} is not a regular file: refused (remove it)")


# The data tools


def convert(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``tools/convert_rec.py`` in this process: its exit status and its stderr."""
    capsys.readouterr()
    status = tool("convert_rec").main([*argv, "--quiet"] if argv[0] != "to-folder" else list(argv))
    return status, capsys.readouterr().err


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute", "..", "", "a/b"])
def test_to_folder_names_from_classes_txt_stay_inside_the_output(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    data = shutil.copytree(demo_data, tmp_path / "data")
    lines = (data / "classes.txt").read_text().splitlines()
    lines[3] = name
    (data / "classes.txt").write_text("\n".join(lines) + "\n")
    before = tree(tmp_path)
    status, err = convert(capsys, "to-folder", str(data), str(tmp_path / "out" / "faces"))
    problem = "not a folder name" if name in ("", "..") else "holds a path separator"
    assert (status, err) == (1, f"error: {data / 'classes.txt'}: line 4: identity {name!r} is {problem}: refused\n")
    assert tree(tmp_path) == before and not Path("/tmp/absolute").exists()


def test_to_folder_never_replaces_a_folder_that_holds_something(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shutil.copytree(demo_data, tmp_path / "data")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    before = tree(tmp_path)
    for out in (mine, data):
        status, err = convert(capsys, "to-folder", str(data), str(out))
        assert (status, err) == (1, f"error: {out}: exists and is not an empty folder: to-folder writes a new folder "
                                    "(choose another, or remove this one yourself)\n")
    os.chdir(data)
    try:
        assert convert(capsys, "to-folder", str(data), ".")[0] == 1
    finally:
        os.chdir(ROOT)
    assert tree(tmp_path) == before
    (tmp_path / "empty").mkdir()
    status, _ = convert(capsys, "to-folder", str(data), str(tmp_path / "empty"))
    assert status == 0 and len(list((tmp_path / "empty").iterdir())) == 24


def test_from_folder_refuses_an_identity_whose_name_holds_a_line_break(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``eve\\nmallory`` would take two lines of classes.txt and shift every later name."""
    for name in ("alice", "eve\nmallory", "zed"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        Image.new("RGB", (112, 112), (40, 80, 120)).save(tmp_path / "faces" / name / "0.jpg")
    status, err = convert(capsys, "from-folder", str(tmp_path / "faces"), str(tmp_path / "out"))
    assert (status, err) == (1, f"error: {tmp_path / 'faces'}: identity folder name 'eve\\nmallory' holds a line "
                                "break: classes.txt holds one name per line (rename the folder)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["from-folder", "repack", "to-folder"])
def test_writing_onto_a_read_only_mount_is_one_line(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tmpfs: Callable[..., Path], command: str
) -> None:
    read_only = tmpfs("1m", "ro")
    source = str(demo_data)
    if command == "from-folder":
        assert convert(capsys, "to-folder", str(demo_data), str(tmp_path / "faces"))[0] == 0
        source = str(tmp_path / "faces")
    status, err = convert(capsys, command, source, str(read_only / "out"))
    assert status == 1 and err.count("\n") == 1 and err.startswith("error: ") and "read-only file system" in err, err


def test_the_sampling_study_never_renders_over_a_users_dataset(demo_data: Path, tmp_path: Path) -> None:
    data = shutil.copytree(demo_data, tmp_path / "data")
    (data / "heldout.bin").unlink()
    before = tree(data)
    result = subprocess.run([sys.executable, "tools/sampling_study.py", "--quick", "--data", str(data), "--out",
                             str(tmp_path / "study")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == (
        f"error: {data}: holds train.rec but no heldout.bin to evaluate on: add your pack as {data / 'heldout.bin'}, "
        "or name an empty --data for synthetic identities\n")
    assert tree(data) == before


# The config


MiB = 1 << 20
BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi"))


def refusal_and_peak(call: Callable[[], object]) -> tuple[str, int]:
    """The ``ConfigError`` line ``call`` ends with, and the peak of the memory Python allocated meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as refused:
            call()
        return str(refused.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("text", "problem"), [
    (BILLION_LAUGHS, "more than 100000 values once its aliases are expanded: refused"),
    ("data: " + "[" * 5_000 + "]" * 5_000 + "\n", "nested too deeply to be a config"),
    ("data: {root: d}\ntrain: {steps: 1}\ntrain: {steps: 2}\n",
     "line 3: duplicate key 'train' (the later value would silently replace the earlier)"),
    ("- data\n- train\n", "the top level must be a mapping of sections (data, model, ...), got list"),
])
def test_a_hostile_config_is_one_line_within_bounded_memory(tmp_path: Path, text: str, problem: str) -> None:
    """Refused before anything is built from it: the 500-byte "billion laughs" asked for 2.4 GB and 40 s."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {problem}')}$"):
        load_config(path, ["train.steps=2"])
    assert time.monotonic() - started < 10
    if "nested" not in problem:  # the nesting stops at the interpreter's recursion limit, which tracing slows 40x
        message, peak = refusal_and_peak(lambda: load_config(path, ["train.steps=2"]))
        assert message == f"{path}: {problem}" and peak < 64 * MiB


def test_a_config_file_larger_than_any_config_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  bins:\n" + "".join(f"  - pack{i}.bin\n" for i in range(100_000)))
    size = path.stat().st_size
    message, peak = refusal_and_peak(lambda: load_config(path))
    assert message == f"{path}: {size} bytes: larger than any config (1048576 bytes at most): refused"
    assert peak < MiB


def test_many_packs_are_checked_for_repeated_names_in_linear_time() -> None:
    """500,000 names took over 400 s with a count per name; a counter takes a fraction of a second."""
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^eval\.bins: packs share the name\(s\) pack0; rename one of the files$"):
        VerificationMonitor([f"a/pack{i}.bin" for i in range(500_000)] + ["b/pack0.bin"], ENV)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("override", "problem"), [
    ("train.steps=[1", "not valid YAML: line 1, column 3: expected ',' or ']', but got '<stream end>'"),
    ("train.steps=!!python/object/apply:os.system [touch MARKER]",
     "not valid YAML: line 1, column 1: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
])
def test_a_bad_override_is_one_line_and_runs_nothing(tmp_path: Path, override: str, problem: str) -> None:
    override = override.replace("MARKER", str(tmp_path / "ran"))
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["data.backend=synthetic", override])
    assert str(refused.value) == f"--set {override}: {problem}"
    assert not (tmp_path / "ran").exists()


# Verification packs


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels: what a header promises costs nothing to write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(
        b"IEND", b"")


def pack_refusal_and_peak(path: Path) -> tuple[str, int]:
    tracemalloc.start()
    try:
        with pytest.raises(VerificationPackError) as refused:
            read_bin(path)
        return str(refused.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_pack_of_empty_lists_is_refused_within_bounded_memory(tmp_path: Path) -> None:
    """A 20 MB file of empty lists took 1.67 GB before it was refused; now the 1001st list stops it."""
    path = tmp_path / "lists.bin"
    path.write_bytes(b"\x80\x02(" + b"]" * 20_000_000 + b"t.")
    message, peak = pack_refusal_and_peak(path)
    assert message == (f"{path}: not a readable verification pack: more than 1000 lists, tuples or dicts: a pack "
                       "holds two lists (the images and issame)")
    assert peak < 3 * path.stat().st_size


def test_an_image_larger_than_a_face_crop_is_refused_from_its_header(tmp_path: Path) -> None:
    """Two 8000 x 8000 PNGs (64 M pixels each, under PIL's own bomb limit): 1.07 GB to decode, refused unread."""
    path = tmp_path / "huge.bin"
    write_bin(path, [png_header_only(8000, 8000)] * 2 + [encode_jpeg(np.zeros((112, 112, 3), np.uint8))] * 18,
              [True] * 10)
    message, peak = pack_refusal_and_peak(path)
    assert message == f"{path}: image 0 is 8000x8000: more than the 16777216 pixels a face crop of a pack may have"
    assert peak < 16 * MiB


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "not a readable verification pack: the file ends before its pickle does"),
    (None, "6 pairs; the 10-fold protocol needs at least 10"),
])
def test_eval_verification_names_the_pack_of_each_problem(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, problem: str
) -> None:
    path = tmp_path / "pack.bin"
    if content is None:
        write_bin(path, [encode_jpeg(np.zeros((112, 112, 3), np.uint8))] * 12, [True] * 6)
    else:
        path.write_bytes(content)
    capsys.readouterr()
    model = tmp_path / "model.onnx"
    assert tool("export_onnx").main(["--checkpoint", str(trained_checkpoint(demo_data, tmp_path)), "--out",
                                     str(model)]) == 0
    assert tool("eval_verification").main(["--onnx", str(model), "--bin", str(path), "--quiet"]) == 1
    assert capsys.readouterr().err == f"error: {path}: {problem}\n"


def trained_checkpoint(demo_data: Path, tmp_path: Path) -> Path:
    """A 2-step run's folder (any trained backbone will do)."""
    run = tmp_path / "run"
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "train.steps=2", "eval.bins=[]") == 0
    return run


# Checkpoints


def deflated(path: Path) -> None:
    """Rewrite the zip archive ``path`` with its records over 1 MiB deflate-compressed (torch.save stores every
    record as it is)."""
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in records:
            kind = zipfile.ZIP_DEFLATED if len(data) > MiB else zipfile.ZIP_STORED
            archive.writestr(info.filename, data, compress_type=kind)


def test_a_compressed_checkpoint_record_is_refused_before_it_inflates(
    demo_data: Path, tmp_path: Path
) -> None:
    """40 MB of zeros deflated into a trainer.pt of 2 MB (its digest updated, as whoever crafts it can): refused
    from the archive's directory, without inflating a byte."""
    run = trained_checkpoint(demo_data, tmp_path)
    checkpoint = run / "checkpoints" / "step-00000002"
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    state["backbone"]["padding"] = torch.zeros(10_000_000)
    torch.save(state, checkpoint / "trainer.pt")
    deflated(checkpoint / "trainer.pt")
    assert (checkpoint / "trainer.pt").stat().st_size < 4 * MiB
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["trainer.pt"] = file_record(checkpoint / "trainer.pt")
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as refused:
            load_trainer_state(checkpoint)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert re.fullmatch(rf"{re.escape(str(checkpoint / 'trainer.pt'))}: refused: its record \S+/data/\d+ is "
                        r"compressed, which torch\.save never writes \(it would inflate to 40000000 bytes\)",
                        str(refused.value)), refused.value
    assert peak < 16 * MiB  # the digest check reads in 8 MiB chunks; inflating would take 40 MB


# Sizes that would be allocated


def test_an_embedding_size_beyond_any_face_model_is_refused_in_the_config() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["data.backend=synthetic", "model.embedding_size=1000000000"])
    assert str(refused.value) == ("--set model.embedding_size=1000000000: 1000000000 is beyond any face embedding "
                                  "(at most 65536)")


def test_a_class_count_out_of_proportion_is_refused_before_the_head_is_allocated(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flat dataset (no identity records to check it against) whose property says 10^9 classes: the head shard
    would ask for 238 GiB."""
    flat = tmp_path / "flat"
    assert convert(capsys, "repack", str(demo_data), str(flat))[0] == 0
    (flat / "property").write_text("1000000000,112,112\n")
    capsys.readouterr()
    status = train_in_process(write_config(tmp_path / "c.yaml", flat, tmp_path / "run"), "eval.bins=[]")
    line = one_error_line(capsys.readouterr().err)
    assert status == 1 and re.fullmatch(
        r"error: the head shard of rank 0 \(1000000000 of 1000000000 classes x 32, with sgd's state\) needs 238\.4 "
        r"GiB, more than the [0-9.]+ GiB free on cpu: check data\.num_classes \(or the dataset's property\) and "
        r"model\.embedding_size, or add ranks", line), line


def test_an_onnx_model_that_asks_for_petabytes_is_one_line(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """213 bytes of graph whose first batch asks onnxruntime for 40 TB: one line naming the file."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [100_000, 100_000_000])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"],
                         value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
        helper.make_node("Add", ["big", "total"], ["embedding"]),
    ]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["B", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, None)], [shape])
    model = tmp_path / "bomb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), model)
    capsys.readouterr()
    assert tool("embed").main(["--onnx", str(model), "--rec", str(demo_data), "--out", str(tmp_path / "e.npy"),
                               "--quiet"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {model}: the model failed on a batch of 128 images: "), line
    assert "Failed to allocate memory" in line and not (tmp_path / "e.npy").exists()


def rewrite_trainer_state(checkpoint: Path, change: Callable[[dict], None]) -> None:
    """Edit ``checkpoint``'s trainer.pt and its digest in the manifest, as whoever edits the file can."""
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    change(state)
    torch.save(state, checkpoint / "trainer.pt")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["trainer.pt"] = file_record(checkpoint / "trainer.pt")
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_an_optimizer_state_of_the_wrong_shape_is_refused_at_load(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It loaded, and the first step failed in a 40-line traceback."""
    run = trained_checkpoint(demo_data, tmp_path)
    checkpoint = run / "checkpoints" / "step-00000002"

    def wrong_momentum(state: dict) -> None:
        state["backbone_optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(10)

    rewrite_trainer_state(checkpoint, wrong_momentum)
    capsys.readouterr()
    assert train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "train.steps=4", "eval.bins=[]") == 1
    line = one_error_line(capsys.readouterr().err)
    assert re.fullmatch(rf"error: {re.escape(str(checkpoint))}: the backbone optimizer state does not fit: "
                        r"momentum_buffer of parameter 0 has shape \[10\], the parameter \[\d+(, \d+)*\]", line), line


def test_a_manifest_whose_model_is_not_a_model_is_one_line(demo_data: Path, tmp_path: Path) -> None:
    run = trained_checkpoint(demo_data, tmp_path)
    manifest_path = run / "checkpoints" / "step-00000002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["model"]["embedding_size"] = [32]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as refused:
        load_backbone(run)
    assert str(refused.value) == f"{manifest_path}: model.embedding_size is [32], not an embedding size"


def test_inspect_verify_finds_an_index_that_names_one_record_for_every_key(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flat dataset whose .idx points every key at the first record read as 192 copies of one image and passed
    with 0 problems."""
    flat = tmp_path / "flat"
    assert convert(capsys, "repack", str(demo_data), str(flat))[0] == 0
    keys = [line.split("\t")[0] for line in (flat / "train.idx").read_text().splitlines()]
    (flat / "train.idx").write_text("".join(f"{key}\t0\n" for key in keys))
    capsys.readouterr()
    assert tool("convert_rec").main(["inspect", str(flat), "--verify", "--quiet"]) == 1  # problems found
    out = capsys.readouterr().out
    assert "checked framing, offsets and full decode: 191 problems" in out
    assert (f"  {flat / 'train.rec'}: key 1 at offset 0: the same record as key 0 (the .idx names one offset for "
            "several keys)") in out


def test_a_property_of_no_classes_is_one_line(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flat = tmp_path / "flat"
    assert convert(capsys, "repack", str(demo_data), str(flat))[0] == 0
    (flat / "property").write_text("-5,112,112\n")
    assert convert(capsys, "inspect", str(flat)) == (
        1, f"error: {flat / 'property'}: expected 'num_classes,height,width' of positive numbers, got '-5,112,112'\n")


@pytest.mark.parametrize(("value", "field"), [("nan", 3), ("inf", 11)], ids=["nan-landmark", "infinite-faceness"])
def test_ijb_meta_values_that_are_not_finite_name_the_line(tmp_path: Path, value: str, field: int) -> None:
    """A NaN landmark was evaluated silently; an infinite faceness ended in '3 of 6 scores are not finite'."""
    make_ijb_set(tmp_path / "IJBC", identities=2)
    meta = tmp_path / "IJBC" / "meta" / "ijbc_name_5pts_score.txt"
    lines = meta.read_text().splitlines()
    fields = lines[1].split()
    fields[field] = value
    lines[1] = " ".join(fields)
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(IjbError) as refused:
        read_ijb(tmp_path / "IJBC")
    assert str(refused.value) == (f"{meta}:2: a value is not a finite number ({lines[1]!r}): '<image> x1 y1 ... x5 y5 "
                                  "<faceness score>'")


# The tools


@pytest.mark.parametrize(("argv", "problem"), [
    (["--steps", "0"], "--steps and --hold-out must be positive, got 0, 12"),
    (["--noise", "closed", "--ratios", "0"], "--ratios 0: no noisy condition to compare (give a ratio above 0)"),
    (["--hold-out", "100000"], "--hold-out 100000: more than the 24 synthetic identities trained on; the outside "
                               "world is rendered too, so hold out at most as many"),
])
def test_noise_study_arguments_are_checked_before_anything_runs(tmp_path: Path, argv: list[str], problem: str) -> None:
    """--steps 0 silently took the default, --ratios 0 trained every run and then failed on a plot, --hold-out
    100000 rendered 5.9 GB."""
    result = subprocess.run([sys.executable, "tools/noise_study.py", "--quick", "--out", str(tmp_path / "study"),
                             *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, f"error: {problem}\n")
    assert not (tmp_path / "study").exists()


def test_an_interrupted_evaluation_tool_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from sface_dist.cli import run_cli

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_cli(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("threshold", ["5", "nan", "-1.5"])
def test_the_finders_threshold_is_a_cosine(tmp_path: Path, threshold: str) -> None:
    """--threshold 5 flagged every image, and nan was taken."""
    result = subprocess.run([sys.executable, "tools/find_noisy_labels.py", "--checkpoint", str(tmp_path), "--out",
                             str(tmp_path / "out"), "--threshold", threshold], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (f"find_noisy_labels.py: error: argument --threshold: {threshold} is not "
                                              "a cosine in [-1, 1]")


def test_outputs_that_cannot_be_written_are_one_line(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tmpfs: Callable[..., Path]
) -> None:
    run = trained_checkpoint(demo_data, tmp_path)
    read_only = tmpfs("1m", "ro")
    (tmp_path / "a-file").write_text("")
    cases = [
        ("find_noisy_labels", ["--checkpoint", str(run), "--out", str(tmp_path / "a-file"), "--quiet"],
         f"error: --out {tmp_path / 'a-file'}: a file: name the folder for suspects.csv, exclude.txt and scores.npz"),
        ("find_noisy_labels", ["--checkpoint", str(run), "--out", str(read_only / "noise"), "--quiet"],
         f"error: {read_only / 'noise'}: read-only file system"),
        ("export_onnx", ["--checkpoint", str(run), "--out", str(read_only / "model.onnx")],
         f"error: {read_only / 'model.onnx'}: cannot be written there: read-only file system"),
    ]
    for name, argv, line in cases:
        capsys.readouterr()
        assert tool(name).main(argv) == 1
        assert one_error_line(capsys.readouterr().err) == line, name


def test_export_onnx_writes_the_opset_asked_for_or_refuses(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--opset 99999 exited 0 claiming opset 99999 for a file of opset 18."""
    run = trained_checkpoint(demo_data, tmp_path)
    result = subprocess.run([sys.executable, "tools/export_onnx.py", "--checkpoint", str(run), "--out",
                             str(tmp_path / "m.onnx"), "--opset", "99999"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
        "export_onnx.py: error: --opset must be from 17 to 23")
    capsys.readouterr()
    assert tool("export_onnx").main(["--checkpoint", str(run), "--out", str(tmp_path / "m.onnx"), "--opset", "20"]) == 0
    assert "opset 20)" in capsys.readouterr().out
    assert [entry.version for entry in onnx.load(str(tmp_path / "m.onnx")).opset_import if entry.domain == ""] == [20]
    result = subprocess.run([sys.executable, "tools/export_onnx.py", "--checkpoint", str(run), "--out",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
        f"export_onnx.py: error: --out {tmp_path}: a folder: name the .onnx file to write")


def test_changing_the_optimizer_on_resume_is_one_line(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It failed inside the optimizer's load ("does not fit: 'step'")."""
    run = trained_checkpoint(demo_data, tmp_path)
    capsys.readouterr()
    status = train_in_process(write_config(tmp_path / "c.yaml", demo_data, run), "optim.name=adamw",
                              "train.steps=4", "eval.bins=[]")
    assert status == 1 and one_error_line(capsys.readouterr().err) == (
        f"error: {run / 'checkpoints' / 'step-00000002'}: optim.name is 'sgd' in the checkpoint and 'adamw' in the "
        "config: restore it, or start a new run (another train.output, or train.overwrite=true)")
