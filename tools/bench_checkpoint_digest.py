"""What checkpoint digests cost: writing and reading one head shard with and without its SHA-256.

    python tools/bench_checkpoint_digest.py                       # a WebFace42M shard at 8 ranks
    python tools/bench_checkpoint_digest.py --classes 10717       # MS1M at 8 ranks

The shard is the head of ``--classes`` classes (default 257,488: WebFace42M's 2,059,906 identities over 8
ranks) with ``--dim`` 512 and SGD's momentum, the file each rank writes into a checkpoint. Side by side, on
the same tensors and folder: ``save_checkpoint`` (one rank) and ``load_head_shard`` as they run, and the
same calls with the digest taken out (the hashing writer replaced by the bare file, the check by nothing).
Reads come from the page cache (the file was just written), so the read column is the digest's CPU cost, not
the disk's. Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from unittest import mock

import torch

from sface_dist import checkpoint
from sface_dist.checkpoint import load_head_shard, save_checkpoint
from sface_dist.file_digest import file_record
from sface_dist.heads import ShardedSFaceHead, ShardOptimizer


class BareWriter:
    """``DigestWriter``'s interface without the hash: the baseline."""

    def __init__(self, file: BinaryIO) -> None:
        self.write, self.flush = file.write, file.flush

    def record(self) -> dict[str, Any]:
        return {}


@contextlib.contextmanager
def without_digests(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    with mock.patch.object(checkpoint, "DigestWriter", BareWriter), \
            mock.patch.object(checkpoint, "verified_file", lambda folder, name, manifest=None: folder / name):
        yield


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
    head_state, optimizer_state = head.state_dict(), optimizer.state_dict()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-digest-"))
    steps = iter(range(1, 10_000))

    def save(bare: bool) -> Path:
        state = {"step": next(steps), "backbone": {}, "backbone_optimizer": {}, "rng": {}, "progress": {}}
        with without_digests(bare):
            return save_checkpoint(root / ("bare" if bare else "hashed"), rank=0, world_size=1, trainer_state=state,
                                   head_state=head_state, head_optimizer_state=optimizer_state,
                                   num_classes=args.classes, config={}, keep=1)

    def load(bare: bool) -> None:
        with without_digests(bare):
            load_head_shard(folder[bare], (0, args.classes), args.classes)

    try:
        folder = {bare: save(bare) for bare in (True, False)}

        rows = [(name, best_of(args.repeat, lambda: run(True)), best_of(args.repeat, lambda: run(False)))
                for name, run in (("read (load_head_shard)", load), ("write (save_checkpoint)", save))]
        shard = max(save(False).iterdir(), key=lambda path: path.stat().st_size)
        hash_only = best_of(args.repeat, lambda: file_record(shard))
        size = shard.stat().st_size
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# head shard of {args.classes:,} classes x {args.dim} (weight + SGD momentum, fp32): "
          f"{size / 2**30:.3f} GiB; {torch.get_num_threads()} threads")
    print("| | without digest (s) | with SHA-256 (s) | cost of the digest |")
    print("|---|---|---|---|")
    for name, bare, hashed in rows:
        print(f"| {name} | {bare:.3f} | {hashed:.3f} | {hashed - bare:+.3f} s ({(hashed - bare) / bare:+.0%}) |")
    print(f"SHA-256 of the shard alone: {hash_only:.3f} s ({size / 2**30 / hash_only:.2f} GiB/s)")


if __name__ == "__main__":
    main()
