"""What checkpoint digests cost: writing and reading one head shard with and without its SHA-256.

    python tools/bench_checkpoint_digest.py                       # a WebFace42M shard at 8 ranks
    python tools/bench_checkpoint_digest.py --classes 10717       # MS1M at 8 ranks

The shard is the head of ``--classes`` classes (default 257,488: WebFace42M's 2,059,906 identities over 8
ranks) with ``--dim`` 512 and SGD's momentum, the file each rank writes into a checkpoint. Side by side, on
the same tensors and file: ``torch.save`` + fsync alone (the baseline) against the same through
``DigestWriter``, which hashes the bytes as they are written (what ``save_checkpoint`` does); the
weights-only ``torch.load`` alone against ``verify_file`` (size and SHA-256) then the load, what every
reader of a checkpoint does. Reads come from the page cache (the file was just written), so the read
column is the digest's CPU cost, not the disk's. Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sface_dist.checkpoint import load_weights
from sface_dist.file_digest import DigestWriter, file_record, verify_file
from sface_dist.heads import ShardedSFaceHead, ShardOptimizer


def best_of(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=257_488, help="classes in the shard (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size (default: %(default)s)")
    parser.add_argument("--dir", type=Path, default=None, help="folder to write in (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, the fastest kept (default: %(default)s)")
    args = parser.parse_args()

    head = ShardedSFaceHead(args.classes, args.dim, impl="chunked")
    optimizer = ShardOptimizer(head, lr=0.1, momentum=0.9)
    head.weight.grad = torch.randn_like(head.weight)
    optimizer.step(None)
    shard = {"head": head.state_dict(), "optimizer": optimizer.state_dict()}
    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-digest-"))
    path = folder / "head.pt"
    record: dict[str, object] = {}

    def save(hashed: bool) -> None:
        with open(path, "wb") as f:
            writer = DigestWriter(f) if hashed else f
            torch.save(shard, writer)
            f.flush()
            os.fsync(f.fileno())
        if isinstance(writer, DigestWriter):
            record.update(writer.record())

    def load(hashed: bool) -> None:
        if hashed:
            verify_file(path, record)
        load_weights(path)

    try:
        rows = [(name, best_of(args.repeat, lambda: run(False)), best_of(args.repeat, lambda: run(True)))
                for name, run in (("write + fsync", save), ("read (page cache)", load))]
        hash_only = best_of(args.repeat, lambda: file_record(path))
        size = path.stat().st_size
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"# head shard of {args.classes:,} classes x {args.dim} (weight + SGD momentum, fp32): "
          f"{size / 2**30:.3f} GiB; {torch.get_num_threads()} threads")
    print("| | torch.save / torch.load alone (s) | with SHA-256 (s) | cost of the digest |")
    print("|---|---|---|---|")
    for name, baseline, hashed in rows:
        print(f"| {name} | {baseline:.3f} | {hashed:.3f} | {hashed - baseline:+.3f} s "
              f"({(hashed - baseline) / baseline:+.0%}) |")
    print(f"SHA-256 of the shard alone: {hash_only:.3f} s ({size / 2**30 / hash_only:.2f} GiB/s)")


if __name__ == "__main__":
    main()
