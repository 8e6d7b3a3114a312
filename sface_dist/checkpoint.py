"""Atomic, world-size-independent checkpoints.

Layout of ``OUTPUT/checkpoints``::

    step-00001200/
        manifest.json                step, world size, class count, head file names, the resolved config, and the
                                     size and SHA-256 of every other file (``files``)
        trainer.pt                   backbone, backbone optimizer, RNG state, data position (rank 0)
        head-00000000-00042871.pt    one file per rank: class range [start, end), the head's and its optimizer's state
    latest                           name of the newest complete checkpoint

and of a best-backbone folder (``OUTPUT/best/<pack>/``, written by the verification monitor)::

    manifest.json                    step, pack, scores, the resolved config, the size and SHA-256 of backbone.pt
    backbone.pt                      the backbone's state dict

A checkpoint is written into ``step-N.tmp`` and renamed once every rank has
finished, so a crash never leaves a half-written ``step-N``. The head is stored by
class range: a head file holds the ``state_dict()`` of the head shard and of its optimizer
(``sface_dist/heads``), every tensor in their ``rows`` one entry per class, so a run with
another number of ranks loads the rows it owns from whichever files overlap them.

Every reader checks a file against the size and SHA-256 its manifest records before loading it
(``sface_dist.file_digest``), and refuses a damaged one in one line naming it; checkpoints written
before digests were recorded load with one line saying they are unverified.

This module is the only one that knows the layout: ``checkpoint_manager.CheckpointManager`` drives it
for the trainer, and every other reader goes through ``resolve_checkpoint``, ``read_model_config``,
``read_backbone``, ``read_head_rows`` and the best-backbone functions below.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sface_dist.atomic_write import atomic_folder, atomic_write_text, replace_folder
from sface_dist.config import MAX_EMBEDDING_SIZE
from sface_dist.console import warn
from sface_dist.file_digest import DigestMismatch, DigestWriter, is_record, verify_file
from sface_dist.parallel.agreement import PeerError, all_gather_objects, raise_on_any_rank
from sface_dist.parallel.collectives import group_rank

LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.pt"
STEP_PREFIX = "step-"
BACKBONE_FILE = "backbone.pt"
"""Weights-only backbone state dict of a best-backbone folder."""
RUN_CHECKPOINTS = "checkpoints"
"""A run folder's checkpoints folder."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (refused, unreadable, or not of this run), named with the reason."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder); the previous ``latest`` stays."""


def load_weights(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers, so that reading a file cannot run code.

    Checkpoints are files people download and share: anything else in the pickle is refused,
    with one line naming the file.
    """
    path = Path(path)
    _check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except pickle.UnpicklingError as error:
        lines = str(error).splitlines()
        reason = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain containers ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint file ({reason})") from None


def _check_archive(path: Path) -> None:
    """Refuse a zip archive whose records would grow when read: a compressed record (``torch.save`` writes none;
    ``weights_only`` bounds code, not memory, and 8 MB of deflate inflated to 1.4 GB) or one declared larger than
    the file. A file that is no zip archive is left to ``torch.load`` to refuse."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    size = path.stat().st_size
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: refused: its record {record.filename} is compressed, which torch.save "
                                  f"never writes (it would inflate to {record.file_size} bytes)")
        if record.file_size > size:
            raise CheckpointError(f"{path}: refused: its record {record.filename} declares {record.file_size} bytes "
                                  f"in a {size}-byte file")


TRAINER_KEYS = ("step", "backbone", "backbone_optimizer", "rng", "progress")
"""What every ``trainer.pt`` holds (beside it, newer checkpoints hold ``schedulers`` and ``grad_scaler``): a plain
dict of containers and tensors, each key written by one of the trainer's components
(``sface_dist/training/state.py``)."""


def state_dict_mismatch(error: RuntimeError) -> str:
    """The first problem of a ``load_state_dict`` error, on one line (torch lists every tensor on its own)."""
    problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (problems[0] if problems else str(error).strip()) + more


def _step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:08d}"


def holds_checkpoints(root: Path) -> bool:
    """Whether the checkpoints folder ``root`` holds any step directory, complete or not."""
    return root.is_dir() and any(path.name.startswith(STEP_PREFIX) for path in root.iterdir())


def _head_file(start: int, end: int) -> str:
    return f"head-{start:08d}-{end:08d}.pt"


def _head_file_range(name: str) -> tuple[int, int]:
    """The class range ``[start, end)`` a head file's name records (see ``_head_file``)."""
    start, end = name.removeprefix("head-").removesuffix(".pt").split("-")
    return int(start), int(end)


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A class-range state dict with its ``rows`` tensors on the CPU."""
    return {**state, "rows": {key: value.detach().cpu() for key, value in state["rows"].items()}}


def _save(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save`` through a file this process opens and syncs, so a full disk surfaces as ``ENOSPC``; returns
    the file's digest record, computed on the bytes as they are written."""
    with open(path, "wb") as f:
        writer = DigestWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as error:  # torch's zip writer reports a failed write as its own error
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return writer.record()


def _write_error(path: Path, error: OSError) -> CheckpointWriteError:
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    return CheckpointWriteError(f"cannot write checkpoint {path}: {reason}")


def save_checkpoint(
    root: str | Path,
    *,
    rank: int,
    world_size: int,
    trainer_state: dict[str, Any],
    head_state: dict[str, Any],
    head_optimizer_state: dict[str, Any],
    num_classes: int,
    config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Collective: every rank writes its head shard, rank 0 the rest, then the directory is published.

    ``trainer_state`` is what rank 0 writes to ``trainer.pt``: the ``TRAINER_KEYS`` and any newer ones.

    ``head_state`` and ``head_optimizer_state`` are the ``state_dict()`` of this rank's head shard and
    of its optimizer: class-range state dicts whose ``rows`` tensors hold one entry per class.

    A rank that cannot write (full disk, read-only folder) stops every rank with one error; the
    half-written ``step-N.tmp`` is removed and ``latest`` keeps naming the previous checkpoint.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    final = _step_dir(root, trainer_state["step"])
    tmp = final.with_name(final.name + ".tmp")
    start, end = head_state["class_start"], head_state["class_end"]
    head_name = _head_file(start, end)
    head_record: dict[str, Any] = {}
    error: CheckpointWriteError | None = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as failure:
        error = _write_error(tmp, failure)
    raise_on_any_rank(error)
    try:
        head_record = _save(
            {
                "class_start": start,
                "class_end": end,
                "head": _to_cpu(head_state),
                "optimizer": _to_cpu(head_optimizer_state),
            },
            tmp / head_name,
        )
    except OSError as failure:
        error = _write_error(tmp / head_name, failure)
    try:
        raise_on_any_rank(error)
    except (CheckpointWriteError, PeerError):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = dict(all_gather_objects((head_name, head_record)))
    if rank == 0:
        try:
            files[TRAINER_FILE] = _save(trainer_state, tmp / TRAINER_FILE)
            manifest = {
                "step": trainer_state["step"],
                "world_size": world_size,
                "num_classes": num_classes,
                "head_files": sorted(name for name in files if name.startswith("head-")),
                "files": dict(sorted(files.items())),
                "config": config,
            }
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))  # fsyncs the folder's names too
            _publish(tmp, final)
            atomic_write_text(root / LATEST, final.name)
        except OSError as failure:
            shutil.rmtree(tmp, ignore_errors=True)
            error = _write_error(tmp, failure)
        else:
            _prune(root, keep, final)
    raise_on_any_rank(error)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same step written again) is swapped out by
    renames and deleted only afterwards, so ``latest`` never names a folder that is being deleted."""
    replace_folder(tmp, final, final.with_name(final.name + ".old"))


def _prune(root: Path, keep: int, written: Path) -> None:
    """Delete the oldest checkpoints beyond ``keep``, never ``written`` nor the one ``latest`` names."""
    protected = {written.name}
    pointer = root / LATEST
    if pointer.is_file():
        protected.add(pointer.read_text().strip())
    steps = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.suffix not in (".tmp", ".old"))
    others = [p for p in steps if p.name not in protected]
    for old in others[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def follow_latest(pointer: str | Path) -> Path:
    """The checkpoint directory a ``latest`` pointer file names."""
    pointer = Path(pointer)
    path = pointer.parent / pointer.read_text().strip()
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no {MANIFEST}")
    return path


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints`` dir), if any."""
    pointer = Path(root) / LATEST
    return follow_latest(pointer) if pointer.is_file() else None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint (or best-backbone folder) ``path``; one line when it is unreadable."""
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: no such file: not a checkpoint") from None
    except (OSError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({reason})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: unreadable manifest (expected a JSON object)")
    return manifest


_unverified_reported: set[Path] = set()
"""Checkpoints whose lack of digests this process has reported (once each)."""


def _recorded_files(checkpoint: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's digest records by file name; None for a checkpoint written before they were recorded (said
    once, by the first rank)."""
    files = manifest.get("files")
    if files is None:
        if checkpoint not in _unverified_reported and group_rank(None) == 0:
            _unverified_reported.add(checkpoint)
            warn(f"{checkpoint}: written before checkpoints recorded checksums: its files are read unverified")
        return None
    if not isinstance(files, dict):
        raise CheckpointError(f"{checkpoint / MANIFEST}: 'files' is not a mapping of file names to digests")
    return files


def verified_file(checkpoint: Path, name: str, manifest: dict[str, Any] | None = None) -> Path:
    """``checkpoint / name`` once its size and SHA-256 match the manifest's record (``manifest``: the checkpoint's,
    when the caller has read it); one line naming the file when they do not, or when no record names it."""
    manifest = read_manifest(checkpoint) if manifest is None else manifest
    files = _recorded_files(checkpoint, manifest)
    path = checkpoint / name
    if files is None:
        return path
    if not is_record(files.get(name)):
        raise CheckpointError(f"{path}: its manifest records no checksum for it: refused")
    try:
        verify_file(path, files[name])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except DigestMismatch as error:
        raise CheckpointError(f"{error}: refused") from None
    return path


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The verified ``trainer.pt`` of checkpoint ``path``: a dict holding at least the ``TRAINER_KEYS``."""
    trainer_file = verified_file(Path(path), TRAINER_FILE)
    state = load_weights(trainer_file)
    if not isinstance(state, dict) or not set(TRAINER_KEYS) <= set(state):
        expected = ", ".join(sorted(TRAINER_KEYS))
        raise CheckpointError(f"{trainer_file}: not a trainer state (expected the keys {expected})")
    return state


def _read_head_file(path: Path, num_classes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The head and optimizer state a (verified) head file holds; files of the first layout (``weight`` and SGD's
    ``momentum`` beside the class range) read as the state of a head and its SGD."""
    shard = load_weights(path)
    if isinstance(shard, dict) and isinstance(shard.get("head"), dict) and isinstance(shard.get("optimizer"), dict):
        return shard["head"], shard["optimizer"]
    if not isinstance(shard, dict) or not isinstance(shard.get("weight"), torch.Tensor):
        raise CheckpointError(f"{path}: not a head shard (expected a dict with 'head' and 'optimizer' states)")
    start, end, momentum = shard["class_start"], shard["class_end"], shard.get("momentum")
    head = {"class_start": start, "class_end": end, "num_classes": num_classes, "rows": {"weight": shard["weight"]}}
    rows = {} if momentum is None else {"momentum_buffer": momentum}
    return head, {"name": "sgd", "class_start": start, "class_end": end, "rows": rows}


def _assemble_rows(
    pieces: list[dict[str, Any]], class_range: tuple[int, int], path: Path
) -> dict[str, Any]:
    """One class-range state dict for ``class_range`` from the overlapping ``pieces``: each ``rows``
    tensor's entries copied to where their classes fall; other keys from the first piece."""
    start, end = class_range
    keys = {tuple(sorted(piece["rows"])) for piece in pieces}
    if len(keys) > 1:
        raise CheckpointError(f"{path}: head files hold different state ({' vs '.join(map(str, sorted(keys)))})")
    rows: dict[str, torch.Tensor] = {}
    for piece in pieces:
        lo, hi = max(start, piece["class_start"]), min(end, piece["class_end"])
        for key, value in piece["rows"].items():
            if key not in rows:
                rows[key] = value.new_empty((end - start, *value.shape[1:]))
            rows[key][lo - start : hi - start] = value[lo - piece["class_start"] : hi - piece["class_start"]]
    return {**pieces[0], "class_start": start, "class_end": end, "rows": rows}


def load_head_shard(
    path: str | Path, class_range: tuple[int, int], num_classes: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The head's and its optimizer's ``state_dict()`` for classes ``[start, end)``, assembled from the files
    that overlap them: what ``ShardedHead.load_state_dict`` and ``ShardOptimizer.load_state_dict`` take.

    Only those files are read: at 2M classes on many ranks each rank loads one or two shards, not all.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["num_classes"] != num_classes:
        raise ValueError(
            f"{path}: checkpoint head has {manifest['num_classes']} classes, the run has {num_classes}"
        )
    start, end = class_range
    heads: list[dict[str, Any]] = []
    optimizers: list[dict[str, Any]] = []
    covered = 0
    for name in manifest["head_files"]:
        file_start, file_end = _head_file_range(name)
        if max(start, file_start) >= min(end, file_end):
            continue
        head, optimizer = _read_head_file(verified_file(path, name, manifest), num_classes)
        heads.append(head)
        optimizers.append(optimizer)
        covered += min(end, file_end) - max(start, file_start)
    if covered != end - start:
        raise ValueError(f"{path}: head files cover {covered} of the {end - start} classes [{start}, {end})")
    return _assemble_rows(heads, class_range, path), _assemble_rows(optimizers, class_range, path)


def read_head_rows(path: str | Path, start: int = 0, end: int | None = None) -> torch.Tensor:
    """The head's weight rows (class centres) ``[start, end)`` of checkpoint ``path`` (``end`` None: to the last)."""
    num_classes = head_classes(path)
    rows = (start, num_classes if end is None else end)
    return load_head_shard(path, rows, num_classes)[0]["rows"]["weight"]


def head_classes(path: str | Path) -> int:
    """The class count of checkpoint ``path``'s head; one line when it holds none (a best-backbone folder)."""
    manifest = read_manifest(path)
    if "head_files" not in manifest:
        raise CheckpointError(f"{path}: holds no head (a best-backbone folder?): name a training checkpoint")
    return int(manifest["num_classes"])


def names_a_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is one of the places ``resolve_checkpoint`` takes (any folder, or a ``latest`` file), rather
    than a weights file from elsewhere (``read_foreign_weights``)."""
    path = Path(path)
    return not path.is_file() or path.name == LATEST


def read_foreign_weights(path: str | os.PathLike[str]) -> Any:
    """A weights file that no checkpoint of this project lists (insightface's saved backbone): read as every
    weights file here is (``load_weights``: tensors and containers only, archive records bounded), unverified, since
    no manifest records its digest."""
    return load_weights(path)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory that ``path`` designates: a step directory or a best-backbone folder (each with
    ``manifest.json``), a run's ``checkpoints`` directory or its ``latest`` file, or a run directory."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        return _follow_latest(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / MANIFEST).is_file():
        return path
    for pointer in (path / LATEST, path / RUN_CHECKPOINTS / LATEST):
        if pointer.is_file():
            return _follow_latest(pointer)
    raise CheckpointError(
        f"{path}: not a checkpoint: expected a step directory with {MANIFEST}, a run's checkpoints "
        f"directory or its '{LATEST}' file, or a run directory"
    )


def _follow_latest(pointer: Path) -> Path:
    try:
        return follow_latest(pointer)
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from None


def read_model_config(checkpoint: Path) -> tuple[dict[str, Any], int]:
    """The resolved config stored in ``checkpoint``'s manifest (checked to name the model), and its step."""
    manifest_path = checkpoint / MANIFEST
    manifest = read_manifest(checkpoint)
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{manifest_path}: the manifest holds no 'config', so the backbone architecture is unknown "
            "(checkpoints written by this project's trainer embed their resolved config)"
        )
    model = config.get("model")
    if not isinstance(model, dict) or "backbone" not in model or "embedding_size" not in model:
        raise CheckpointError(f"{manifest_path}: config has no model.backbone / model.embedding_size")
    size, step = model["embedding_size"], manifest.get("step", 0)
    if not isinstance(model["backbone"], str):
        raise CheckpointError(f"{manifest_path}: model.backbone is {model['backbone']!r}, not a backbone name")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_EMBEDDING_SIZE:
        raise CheckpointError(f"{manifest_path}: model.embedding_size is {size!r}, not an embedding size")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{manifest_path}: step is {step!r}, not a step")
    return config, step


def read_backbone(checkpoint: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The backbone weights of a step directory or a best-backbone folder, and the file they come from."""
    if (checkpoint / BACKBONE_FILE).is_file():
        state = load_weights(verified_file(checkpoint, BACKBONE_FILE))
        if not isinstance(state, dict):
            raise CheckpointError(f"{checkpoint / BACKBONE_FILE}: holds no backbone state dict")
        return checkpoint / BACKBONE_FILE, state
    trainer_file = checkpoint / TRAINER_FILE
    if not trainer_file.is_file():
        raise CheckpointError(f"{checkpoint}: has neither {TRAINER_FILE} nor {BACKBONE_FILE}")
    state = load_weights(verified_file(checkpoint, TRAINER_FILE))
    if not isinstance(state, dict) or not isinstance(state.get("backbone"), dict):
        raise CheckpointError(f"{trainer_file}: holds no 'backbone' state dict")
    return trainer_file, state["backbone"]


def save_backbone(directory: str | os.PathLike[str], model: nn.Module, manifest: dict[str, Any]) -> Path:
    """Write a best-backbone folder: ``backbone.pt`` and ``manifest.json`` (which must hold the run's ``config``),
    atomically."""
    directory = Path(directory)
    if not isinstance(manifest.get("config"), dict):
        raise ValueError("a backbone manifest needs the run's config to be loadable")
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    with atomic_folder(directory) as temporary:
        manifest = {**manifest, "files": {BACKBONE_FILE: _save(state, temporary / BACKBONE_FILE)}}
        atomic_write_text(temporary / MANIFEST, json.dumps(manifest, indent=2))
    return directory


def save_best_backbone(
    directory: str | os.PathLike[str], model: nn.Module, *, step: int, pack: str, result: dict[str, Any],
    config: dict[str, Any],
) -> Path:
    """Write the best backbone on verification pack ``pack`` (``result``: its scores) to ``directory``."""
    return save_backbone(directory, model, {"step": step, "pack": pack, "result": result, "config": config})


def read_best_score(directory: str | os.PathLike[str]) -> tuple[float, int] | None:
    """(accuracy, step) that ``save_best_backbone`` recorded in ``directory``; None when it holds none."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text())
        return float(recorded["result"]["accuracy"]), int(recorded["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest}: not a best-backbone manifest ({error!r}); move it away") from None
