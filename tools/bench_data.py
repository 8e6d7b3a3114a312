"""Data-path throughput on this machine, every reader side by side in one run.

``python tools/bench_data.py [--mxnet-python /tmp/mxvenv/bin/python]`` renders synthetic faces
(112x112 JPEGs at quality 95, ~8 KiB), converts them with ``convert_rec from-folder`` (its rate
is the first rows), and measures read + decode + flip + normalise to a float32
``[B, 3, 112, 112]`` batch for: an mxnet reader like the peer's ``MXFaceDataset``
(``MXIndexedRecordIO`` + ``mx.image.imdecode``, in ``--mxnet-python`` when mxnet does not import
here), a plain PIL loop, the ``torch`` backend with 0/1/N workers, the ``dali`` backend and
DALI's own ``fn.readers.mxnet`` on a repacked copy with 1/N threads.

Each row runs in a fresh process pinned to the cores it is credited with (and with
``OMP_NUM_THREADS=1``), so that "one core" means one core and no thread pool of an earlier
row lingers. Rates are the best of ``--repeats`` runs: load from other processes only ever
slows a run down. "img per CPU-second" divides by the CPU time of every process and thread
involved (DataLoader workers included), which other load on the machine barely changes.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from sface_dist.config import DataConfig
from sface_dist.data.convert import EncodeOptions, folder_to_rec, repack
from sface_dist.data.dali import dali_available
from sface_dist.data.loader import build_loader
from sface_dist.data.pixels import PIXEL_MEAN, PIXEL_STD
from sface_dist.data.recordio import FaceRecordIndex, RecordIOReader
from sface_dist.data.synthetic import SyntheticFaces, write_identity_folders

_MXNET_READER = r"""
import sys, time
import numpy as np
import mxnet as mx
from PIL import Image

rec, idx, count, transforms, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
mean, std = float(sys.argv[6]), float(sys.argv[7])  # the project's pixel normalisation
record_io = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
header, _ = mx.recordio.unpack(record_io.read_idx(0))
keys = list(range(1, int(header.label[0]))) if header.flag > 0 else list(record_io.keys)
rng = np.random.default_rng(0)

if transforms == "peer":
    import torch  # the peer's transforms are torchvision's, which run these torch ops
    torch.set_num_threads(1)

def to_tensor(picture):  # torchvision.transforms.functional.to_tensor for an RGB PIL image
    tensor = torch.from_numpy(np.array(picture, np.uint8, copy=True))
    tensor = tensor.view(picture.size[1], picture.size[0], 3).permute((2, 0, 1)).contiguous()
    return tensor.to(dtype=torch.get_default_dtype()).div(255)

def normalize(tensor, mean, std):  # torchvision.transforms.functional.normalize, inplace=False
    tensor = tensor.clone()
    mean = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)

def load(key):  # the peer's MXFaceDataset.__getitem__
    header, image = mx.recordio.unpack(record_io.read_idx(key))
    label = header.label if isinstance(header.label, float) else header.label[0]
    pixels = mx.image.imdecode(image).asnumpy()
    if transforms == "peer":  # ToPILImage, RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5)
        picture = Image.fromarray(pixels)
        if torch.rand(1) < 0.5:
            picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
        sample = normalize(to_tensor(picture), [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
        return sample, torch.tensor(label, dtype=torch.long)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return (pixels.transpose(2, 0, 1).astype(np.float32) - mean) / std, int(label)

def batch(keys):  # the DataLoader's default_collate for "peer"; a numpy stack otherwise
    samples = [load(key) for key in keys]
    if transforms == "peer":
        return torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples])
    return np.stack([x for x, _ in samples]), np.array([y for _, y in samples])

batch(keys[:64])
start, cpu = time.perf_counter(), time.process_time()
for first in range(0, count, batch_size):
    batch([keys[i % len(keys)] for i in range(first, min(first + batch_size, count))])
print(count, time.perf_counter() - start, time.process_time() - cpu)
"""


class Measured(NamedTuple):
    """Images processed, wall seconds, and CPU seconds of every process and thread involved."""

    images: int
    seconds: float
    cpu_seconds: float


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes ``pids`` (all their threads), from ``/proc``."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


class Row(NamedTuple):
    """One line of the table: what is measured (``measure`` key), how it is called, on how many cores."""

    measure: str
    label: str
    cores: int


def convert_rate(work: Path, args: argparse.Namespace, cores: int) -> Measured:
    """``folder_to_rec`` over the rendered folders with ``cores`` processes (CPU time includes the pool's)."""
    before = _self_and_children_cpu()
    summary = folder_to_rec(work / "folders", work / f"rec{cores}", EncodeOptions(), progress=False, workers=cores)
    return Measured(summary.num_images, summary.seconds, _self_and_children_cpu() - before)


def _child_pids() -> list[int]:
    """Processes whose parent is this one (DataLoader workers), from ``/proc``."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                children.append(int(entry.name))
    return children


def _self_and_children_cpu() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(part.ru_utime + part.ru_stime for part in usage)


def loader_rate(backend: str, workers: int | None) -> Callable[[Path, argparse.Namespace, int], Measured]:
    """A measure of ``build_loader`` for ``backend`` with ``workers`` workers or DALI threads (None: one per core)."""

    def measure(work: Path, args: argparse.Namespace, cores: int) -> Measured:
        count = cores if workers is None else workers
        cfg = DataConfig(backend=backend, root=str(work / "rec"), batch_size=args.batch_size, num_workers=count)
        loader = build_loader(cfg, 0, 1, seed=0)
        epoch = 0
        loader.set_epoch(epoch)
        iterator = iter(loader)
        next(iterator)  # warm-up: workers started, pipeline built
        pids = [os.getpid(), *_child_pids()]
        done, start, cpu = 0, time.perf_counter(), cpu_seconds(pids)
        while done < args.per_row:
            for images, _ in iterator:
                done += len(images)
                if done >= args.per_row:
                    break
            else:
                epoch += 1
                loader.set_epoch(epoch)
                iterator = iter(loader)
        return Measured(done, time.perf_counter() - start, cpu_seconds(pids) - cpu)

    return measure


def pil_rate(work: Path, args: argparse.Namespace, cores: int) -> Measured:
    """A plain loop: pread + PIL decode + flip + normalise, one image at a time."""
    reader = RecordIOReader(work / "rec" / "train.rec", work / "rec" / "train.idx")
    index = FaceRecordIndex(reader)
    rng = np.random.default_rng(0)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(args.per_row):
        _, encoded = index.read(i % len(index))
        pixels = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        (pixels.transpose(2, 0, 1).astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    return Measured(args.per_row, time.perf_counter() - start, time.process_time() - cpu)


def dali_native_rate(threads: int | None) -> Callable[[Path, argparse.Namespace, int], Measured]:
    """A measure of DALI's own ``fn.readers.mxnet`` + CPU decode + flip + normalise on the repacked file."""

    def measure(work: Path, args: argparse.Namespace, cores: int) -> Measured:
        from nvidia.dali import fn, pipeline_def, types  # DALI stays optional

        flat = work / "flat"

        @pipeline_def(batch_size=args.batch_size, num_threads=threads or cores, device_id=None, seed=0)
        def native() -> tuple[object, object]:
            encoded, labels = fn.readers.mxnet(
                path=[str(flat / "train.rec")], index_path=[str(flat / "train.idx")], random_shuffle=True
            )
            decoded = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            normalised = fn.crop_mirror_normalize(
                decoded, dtype=types.FLOAT, output_layout="CHW", mean=[PIXEL_MEAN] * 3, std=[PIXEL_STD] * 3,
                mirror=fn.random.coin_flip(),
            )  # fmt: skip
            return normalised, labels

        pipeline = native()
        pipeline.build()
        pipeline.run()
        done, start, cpu = 0, time.perf_counter(), time.process_time()
        while done < args.per_row:
            np.asarray(pipeline.run()[0].as_tensor())
            done += args.batch_size
        return Measured(done, time.perf_counter() - start, time.process_time() - cpu)

    return measure


MEASURES: dict[str, Callable[[Path, argparse.Namespace, int], Measured]] = {
    "convert": convert_rate,
    "pil": pil_rate,
    "torch-0": loader_rate("torch", 0),
    "torch-1": loader_rate("torch", 1),
    "torch-all": loader_rate("torch", None),
    "dali-1": loader_rate("dali", 1),
    "dali-all": loader_rate("dali", None),
    "dali-native-1": dali_native_rate(1),
    "dali-native-all": dali_native_rate(None),
}


def best_run(row: Row, work: Path, args: argparse.Namespace) -> Measured | str:
    """The fastest of ``args.repeats`` runs of ``row`` (other load on the machine only ever slows a run down)."""
    runs = [run_row(row, work, args) for _ in range(args.repeats)]
    measured = [run for run in runs if isinstance(run, Measured)]
    return max(measured, key=lambda run: run.images / run.seconds) if measured else runs[0]


def run_row(row: Row, work: Path, args: argparse.Namespace) -> Measured | str:
    """Run ``row`` in a fresh process pinned to its first ``row.cores`` cores: what it measured, or why it failed."""
    cores = sorted(os.sched_getaffinity(0))[: row.cores]
    if row.measure.startswith("mxnet-"):
        python = args.mxnet_python or sys.executable
        rec, idx = str(work / "rec" / "train.rec"), str(work / "rec" / "train.idx")
        command = [python, "-c", _MXNET_READER, rec, idx, str(args.per_row // 2), row.measure.removeprefix("mxnet-"),
                   str(args.batch_size), str(PIXEL_MEAN), str(PIXEL_STD)]  # fmt: skip
    else:
        command = [sys.executable, __file__, "--measure", row.measure, "--work", str(work), "--cores", str(row.cores),
                   "--per-row", str(args.per_row), "--batch-size", str(args.batch_size)]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # the data path needs no OpenMP; idle OpenMP threads spin
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["failed"])[-1]
        hint = "; pass --mxnet-python" if row.measure.startswith("mxnet-") else ""
        return f"skipped: {Path(command[0]).name} failed ({last[:90]}){hint}"
    images, seconds, cpu = result.stdout.split()[-3:]
    return Measured(int(images), float(seconds), float(cpu))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="dataset size (default: 4000)")
    parser.add_argument("--per-row", type=int, default=6000, help="images timed per row (default: 6000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row, the best one counts (default: 3)")
    parser.add_argument("--mxnet-python", default=None, help="interpreter with mxnet 1.9 for the baseline rows")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # one row, in the pinned child process run_row started
        print(*MEASURES[args.measure](args.work, args, args.cores))
        return 0

    cores = len(os.sched_getaffinity(0))
    rows = [
        Row("convert", "convert_rec from-folder, 1 process", 1),
        Row("convert", f"convert_rec from-folder, {cores} processes", cores),
        Row("mxnet-numpy", "mxnet MXIndexedRecordIO + imdecode, numpy flip + normalise", 1),
        Row("mxnet-peer", "mxnet reader + the peer's torchvision transforms and collate (torch ops)", 1),
        Row("pil", "PIL loop (pread + decode + flip + normalise)", 1),
        Row("torch-0", "torch backend, 0 workers", 1),
        Row("torch-1", "torch backend, 1 worker", 1),
        Row("torch-all", f"torch backend, {cores} workers", cores),
    ]
    if dali_available():
        rows += [
            Row("dali-1", "dali backend (CPU), 1 thread", 1),
            Row("dali-all", f"dali backend (CPU), {cores} threads", cores),
            Row("dali-native-1", "DALI fn.readers.mxnet (CPU), 1 thread, repacked file", 1),
            Row("dali-native-all", f"DALI fn.readers.mxnet (CPU), {cores} threads, repacked file", cores),
        ]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-data-") as temporary:
        work = args.work or Path(temporary)
        folders = work / "folders"
        if not folders.is_dir():
            print(f"rendering {args.images} faces into {folders} ...", file=sys.stderr, flush=True)
            faces = SyntheticFaces(args.images // 20, image_size=112)
            write_identity_folders(faces, folders, 20, range(args.images // 20), suffix=".bmp")
        folder_to_rec(folders, work / "rec", EncodeOptions(), progress=False)
        if dali_available():
            repack(work / "rec" / "train.rec", work / "flat", progress=False)
        mean_kib = (work / "rec" / "train.rec").stat().st_size / args.images / 1024
        rates = []
        for row in rows:
            print(f"measuring {row.label} ...", file=sys.stderr, flush=True)
            rates.append(best_run(row, work, args))

    baseline = rates[2]
    print(f"\n{args.images} images of 112x112, JPEG q95, {mean_kib:.1f} KiB per record; batch {args.batch_size}; "
          f"{cores} CPU cores ({os.uname().machine}); to float32 [B, 3, 112, 112]; best of {args.repeats} runs; "
          f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| reader | cores | img/s | img per CPU-second | CPU-second vs mxnet reader |")
    print("|---|---|---|---|---|")
    for row, run in zip(rows, rates, strict=True):
        if isinstance(run, str):
            print(f"| {row.label} | {row.cores} | {run} | | |")
            continue
        per_cpu = run.images / run.cpu_seconds
        versus = ""
        if isinstance(baseline, Measured) and row.measure != "convert":
            versus = f"{per_cpu / (baseline.images / baseline.cpu_seconds):.2f}x"
        print(f"| {row.label} | {row.cores} | {run.images / run.seconds:,.0f} | {per_cpu:,.0f} | {versus} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
