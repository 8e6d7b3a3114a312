"""What the study tools share: the resumable loop over runs, launching one training run, writing a result
atomically, mean ± std."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sface_dist.checkpoint import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


Result = dict[str, object]


def run_each(
    jobs: Sequence[tuple[str, Path]],
    run: Callable[[int], Result],
    summary: Callable[[Result], str],
    complete: Callable[[int, Result], Result] = lambda _, result: result,
) -> list[Result]:
    """The result of every (name, folder) job: ``complete(i, FOLDER/result.json)`` where that file exists (the
    job ran in an earlier invocation), else ``run(i)``, which writes it, announced with the time left and
    followed by its ``summary``. ``run``'s result carries its ``seconds``."""
    results, trained, spent = [], 0, 0.0
    for number, (name, folder) in enumerate(jobs, 1):
        if (folder / "result.json").is_file():
            results.append(complete(number - 1, json.loads((folder / "result.json").read_text())))
            continue
        left = len(jobs) - number + 1
        eta = f", ~{spent / trained * left / 60:.0f} min left" if trained else ""
        print(f"[{number}/{len(jobs)}] {name}{eta}", flush=True)
        result = run(number - 1)
        trained, spent = trained + 1, spent + float(result["seconds"])  # type: ignore[arg-type]
        print(f"    {summary(result)}", flush=True)
        results.append(result)
    return results


def launch_training(config: Path, overrides: list[str], nproc: int, log: Path, name: str) -> None:
    """``sface_dist.train CONFIG --set ...`` (under torchrun for more than one rank), its output appended to ``log``."""
    launcher = [sys.executable, "-m", "sface_dist.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "sface_dist.train"]
    command = [*launcher, str(config), *[item for value in overrides for item in ("--set", value)]]
    with open(log, "a") as stream:
        status = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT).returncode
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
