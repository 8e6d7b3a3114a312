"""What the study tools share: the resumable loop over runs, each keyed by the settings that determine it,
launching one training run, writing a result atomically, mean ± std.

A study folder holds one study: ``OUT/study.json`` records what its data are made from, and each run's folder
its ``settings.json`` (config file and its digest, overrides, budget, ranks, the run's own parameters, and the
code version). A later invocation reuses a run only when its settings are the same; other settings are refused
in one line naming what differs, before anything is trained or overwritten.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sface_dist.atomic_write import atomic_write_text
from sface_dist.config import flatten
from sface_dist.file_digest import file_record

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = "settings.json"
STUDY = "study.json"


Result = dict[str, Any]
STOPPED_BY_SIGNAL = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}
"""Exit statuses of a run stopped by Ctrl-C or SIGTERM: its checkpoint written (``sface_dist.train``) or killed
before it could be; the study stops too, and the same command continues."""
FAILED = "failed"
"""The key of a failed job's result: why it failed."""


def code_version() -> str:
    """The commit the tools run from, with ``+changes`` when tracked files differ from it (``unknown`` outside git)."""
    def git(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    changed = git("diff", "--quiet", "HEAD").returncode != 0
    return head.stdout.strip() + ("+changes" if changed else "")


def file_identity(path: str | Path) -> dict[str, Any]:
    """What a file contributes to a result: where it is and what it holds (size and SHA-256)."""
    return {"path": str(Path(path).resolve()), **file_record(path)}


def dataset_identity(rec: Path) -> dict[str, Any]:
    """What a RecordIO dataset contributes to a result, cheaply: the ``.rec``'s path and size, and the digest of its
    ``.idx`` (every record's key and offset)."""
    return {"rec": str(rec.resolve()), "rec_bytes": rec.stat().st_size, "idx": file_record(rec.with_suffix(".idx"))}


def plain(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as they read back from JSON (tuples become lists), so that a recorded copy compares equal."""
    return json.loads(json.dumps(settings))


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    """The first keys whose values differ, as ``key: saved -> wanted``."""
    before, after = flatten(saved), flatten(wanted)
    keys = [key for key in {**before, **after} if before.get(key) != after.get(key)]
    shown = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in keys[:3]]
    return "; ".join(shown) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")


def _refuse(folder: Path, why: str) -> ValueError:
    return ValueError(f"{folder}: {why}: choose another --out for these settings, or delete {folder} to make it again")


def _recorded(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def claim_study(out: Path, settings: dict[str, Any]) -> None:
    """``OUT/study.json``: what the study's data are made from; a folder made for other data is refused."""
    saved, settings = _recorded(out, STUDY), plain(settings)
    if saved is None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / STUDY, settings)
    elif saved != settings:
        raise _refuse(out, f"made with other settings ({differences(saved, settings)})")


def run_each(
    jobs: Sequence[tuple[str, Path, dict[str, Any]]],
    run: Callable[[int], Result],
    summary: Callable[[Result], str],
    complete: Callable[[int, Result], Result] = lambda _, result: result,
    parallel: int = 1,
    keep_going: bool = False,
) -> list[Result]:
    """The result of every (name, folder, settings) job: ``complete(i, FOLDER/result.json)`` where that file exists
    (the job ran in an earlier invocation with the same settings), else ``run(i)``, which writes it, announced with
    the time left and followed by its ``summary``; ``parallel`` jobs at a time, in threads (``run`` launches its
    training as a subprocess). ``run``'s result carries its ``seconds``; every result carries its ``settings`` and
    the ``code`` version that produced it. With ``keep_going`` a job whose ``run`` raises ``RuntimeError`` (its
    training failed) is reported and returned as ``{FAILED: message, ...}`` and the others go on; it writes no
    result, so the next invocation tries it again.

    Before any job runs, one whose folder records other settings (or holds a result without them) is refused
    (``ValueError``, one line).
    """
    code = code_version()
    jobs = [(name, folder, plain(settings)) for name, folder, settings in jobs]
    recorded = {folder: _recorded(folder, SETTINGS) for _, folder, _ in jobs}
    for _, folder, settings in jobs:
        saved = recorded[folder]
        if saved is None and (folder / "result.json").is_file():
            raise _refuse(folder, f"holds a result but no {SETTINGS} saying what made it")
        if saved is not None and saved["settings"] != settings:
            raise _refuse(folder, f"made with other settings ({differences(saved['settings'], settings)})")
    reused: dict[str, int] = {}
    results: dict[int, Result] = {}
    pending = []
    for index, (name, folder, settings) in enumerate(jobs):
        saved = recorded[folder]
        if saved is not None and (folder / "result.json").is_file():
            if saved["code"] != code:
                reused[saved["code"]] = reused.get(saved["code"], 0) + 1
            result = complete(index, json.loads((folder / "result.json").read_text()))
            results[index] = {**result, "settings": settings, "code": saved["code"]}
        else:
            pending.append(index)
    progress = {"trained": 0, "spent": 0.0}
    lock = threading.Lock()

    def start(index: int) -> Result:
        name, folder, settings = jobs[index]
        with lock:
            if recorded[folder] is None:
                folder.mkdir(parents=True, exist_ok=True)
                write_json(folder / SETTINGS, {"settings": settings, "code": code})
            left = len(pending) - progress["trained"]
            eta = (f", ~{progress['spent'] / progress['trained'] * left / parallel / 60:.0f} min left"
                   if progress["trained"] else "")
            print(f"[{index + 1}/{len(jobs)}] {name}{eta}", flush=True)
        started = time.perf_counter()
        label = f"{name}: " if parallel > 1 else ""
        try:
            result = run(index)
        except RuntimeError as error:
            if not keep_going:
                raise
            with lock:
                print(f"    {label}failed: {error}", flush=True)
            return {FAILED: str(error), "seconds": time.perf_counter() - started, "settings": settings, "code": code}
        with lock:
            progress["trained"] += 1
            progress["spent"] += float(result["seconds"])
            print(f"    {label}{summary(result)}", flush=True)
        return {**result, "settings": settings, "code": code}

    if parallel == 1:
        for index in pending:
            results[index] = start(index)
    else:
        with ThreadPoolExecutor(parallel) as pool:
            futures = {index: pool.submit(start, index) for index in pending}
            try:
                for index, future in futures.items():
                    results[index] = future.result()
            except BaseException:
                for future in futures.values():
                    future.cancel()
                raise
    for made_by, count in reused.items():
        print(f"reused {count} result(s) made by code {made_by} (this is {code})", flush=True)
    return [results[index] for index in range(len(jobs))]


def launch_training(config: Path, overrides: list[str], nproc: int, log: Path, name: str, threads: int = 0) -> None:
    """``sface_dist.train CONFIG --set ...`` (under torchrun for more than one rank), its output appended to ``log``;
    ``threads`` > 0 caps its CPU threads (``OMP_NUM_THREADS``), for runs that share the machine."""
    launcher = [sys.executable, "-m", "sface_dist.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "sface_dist.train"]
    command = [*launcher, str(config), *[item for value in overrides for item in ("--set", value)]]
    with open(log, "a") as stream:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads > 0 else None
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            status = process.wait()
        except KeyboardInterrupt:
            process.wait()  # Ctrl-C reached the run too: it stops at a step boundary with a checkpoint
            raise
    if status in STOPPED_BY_SIGNAL:
        raise KeyboardInterrupt  # the run stopped at a signal (Ctrl-C reached it in a thread of a parallel study)
    if status != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{name}: training exited with status {status}: {tail[0]} (log: {log})")


def render_synthetic(out: Path, identities: int, images: int, heldout: int, pairs: int) -> None:
    """``tools/make_demo_data.py``'s synthetic identities in ``out``: ``train.rec``, and ``heldout.bin`` with
    ``pairs`` verification pairs of ``heldout`` further identities."""
    command = [sys.executable, str(ROOT / "tools" / "make_demo_data.py"), "--out", str(out), "--identities",
               str(identities), "--images", str(images), "--heldout", str(heldout), "--pairs", str(pairs)]
    print(f"synthetic data: {identities} identities x {images} images in {out}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def write_json(path: Path, value: object) -> None:
    """``value`` as JSON at ``path``, replacing it whole: a cut study never leaves half a result."""
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """``mean ± std`` of ``values`` times ``scale`` (percent by default); the mean alone for one value."""
    mean = scale * float(np.mean(values))
    return f"{mean:.2f} ± {scale * float(np.std(values)):.2f}" if len(values) > 1 else f"{mean:.2f}"
