"""Time and peak extra memory of one head shard's fwd+bwd, every implementation side by side.

    python tools/bench_head.py                                    # CUDA: MS1M/WebFace42M shards; CPU: small ones
    python tools/bench_head.py --device cpu --shapes 1024x100000 --impls floor,chunked,dense
    python tools/bench_head.py --live-pairs runs/demo/checkpoints/step-00000372 --random-init

Rows: ``floor`` (the three matmuls cos, ∂x̂, ∂W alone, operands pre-cast), ``triton`` and
``triton-sparse`` (fused kernels, exact and ``--skip-threshold``, tile ``--tiles``), ``chunked``,
``dense`` (autograd through the [B, C] cosines, like the official SFace) — each SFace row
normalises the rows and runs one block over all classes, as the head does — and ``pfc`` / ``pfc-0.2``:
a PartialFC_V2-style ArcFace head (``ShardedMarginHead``, the project's sharded equivalent: fp16
matmul on CUDA, fp32 on CPU, distributed softmax, sample rate 1.0 and 0.2; unlike insightface its
margin is differentiable — docs/heads.md). Every case runs in a fresh child process, so one case's
caches and allocator pools cannot flatter the next. Peak extra memory is, on CUDA,
``max_memory_allocated`` over one fwd+bwd minus what was allocated before it; on CPU, the
peak RSS over the first fwd+bwd (VmHWM, reset through /proc/self/clear_refs) minus the RSS
before it, with glibc's mmap threshold pinned at 64 KiB so that freed tensors leave the RSS
(times on CPU come from a second child with the default allocator). Both include the fp32 ∂W
(C·D·4 bytes), which every head produces.

Inputs are "trained-like" (``sface_dist/heads/probe.py``): each row at cos ~0.7 from its class centre,
other centres random — the geometry where sparse mode pays most; ``--live-pairs`` measures real checkpoints.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sface_dist.heads import ShardedMarginHead, ShardedSFaceHead
from sface_dist.heads.kernels.fused import (
    CUDA_TILES,
    TileConfig,
    interpreter_enabled,
    sface_block_triton,
    triton_available,
)
from sface_dist.heads.kernels.sparsity import live_pairs
from sface_dist.heads.margin import MarginParams
from sface_dist.heads.probe import embeddings_at_cosine
from sface_dist.heads.sface import BlockFn, BlockOptions, SFaceParams, sface_block_chunked, sface_block_dense

CUDA_SHAPES = "1024x10717,1024x257488,4096x257488"
CPU_SHAPES = "256x10717,1024x20000"
IMPLS = ("floor", "triton", "triton-sparse", "chunked", "dense", "pfc", "pfc-0.2")
MIB = 2**20
COS_TARGET = 0.7
"""Each row's cosine to its class centre, ± the probe's default spread of 0.08."""


def floor_step(embeddings: Tensor, weight: Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """The three matmuls of any head shard, operands already in ``dtype``; G is the cos buffer itself."""
    x = F.normalize(embeddings, dim=1).to(dtype)
    w = weight.to(dtype)

    def step() -> None:
        grad_cos = x @ w.t()
        grad_cos @ w
        grad_cos.t() @ x

    return step


def margin_step(embeddings: Tensor, weight: Tensor, labels: Tensor, sample_rate: float) -> Callable[[], None]:
    """PartialFC_V2-style ArcFace: fp16 cos matmul on CUDA, distributed softmax, negatives sampled."""
    classes, dim = weight.shape
    precision = "fp16" if embeddings.is_cuda else "fp32"
    head = ShardedMarginHead(classes, dim, MarginParams(s=64.0, m2=0.5), precision=precision, sample_rate=sample_rate)
    with torch.no_grad():
        head.weight.copy_(weight)
    head.to(embeddings.device)
    draws = itertools.count(1)

    def step() -> None:
        head.weight.grad = None
        head(embeddings.detach().requires_grad_(True), labels, step=next(draws)).loss.backward()

    return step


def sface_step(
    block: BlockFn, embeddings: Tensor, weight: Tensor, labels: Tensor, precision: str
) -> Callable[[], None]:
    """One SFace block as the head runs it: normalise the rows, score every class, both gradients."""
    weight = weight.clone().requires_grad_(True)
    options = BlockOptions(inv_batch=1.0 / embeddings.shape[0], precision=precision)

    def step() -> None:
        weight.grad = None
        x_hat = F.normalize(embeddings.detach().requires_grad_(True), dim=1)
        block(x_hat, weight, labels, None, SFaceParams(), options).loss.backward()

    return step


def build_step(impl: str, embeddings: Tensor, weight: Tensor, labels: Tensor, args: argparse.Namespace):
    if impl == "floor":
        return floor_step(embeddings, weight, torch.bfloat16 if embeddings.is_cuda else torch.float32)
    if impl.startswith("pfc"):
        return margin_step(embeddings, weight, labels, float(impl.split("-")[1]) if "-" in impl else 1.0)
    blocks: dict[str, BlockFn] = {
        "dense": sface_block_dense,
        "chunked": sface_block_chunked,
        "triton": functools.partial(sface_block_triton, tiles=args.tiles),
        "triton-sparse": functools.partial(sface_block_triton, skip_threshold=args.skip_threshold, tiles=args.tiles),
    }
    return sface_step(blocks[impl], embeddings, weight, labels, args.precision)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def measure_memory(step: Callable[[], None], device: torch.device) -> float:
    """Peak extra MiB of one ``step`` over what was held before it."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    before = reset_peak_rss()
    step()
    return (peak_rss() - before) / MIB


def measure_time(step: Callable[[], None], device: torch.device, repeat: int) -> float:
    """Median ms of ``repeat`` steps (after the caller's warm-up)."""
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_case(impl: str, shape: str, args: argparse.Namespace) -> dict[str, float]:
    """One implementation at one shape, in this process: ``args.measure`` is memory, time or both."""
    device = torch.device(args.device)
    batch, classes = (int(n) for n in shape.split("x"))
    embeddings, weight, labels = embeddings_at_cosine(batch, classes, args.dim, COS_TARGET, device=device)
    step = build_step(impl, embeddings, weight, labels, args)
    result = {}
    if args.measure in ("memory", "both"):
        result["peak_mib"] = measure_memory(step, device)
    else:
        step()
    if args.measure in ("time", "both"):
        result["ms"] = measure_time(step, device, args.repeat)
    return result


def skip_reason(impl: str, device: str) -> str | None:
    """Triton rows need CUDA, or the interpreter (``TRITON_INTERPRET=1``: checks the bench itself, tiny shapes)."""
    if impl.startswith("triton") and not (triton_available() and (device == "cuda" or interpreter_enabled())):
        return "needs CUDA and Triton"
    return None


def run_in_child(impl: str, shape: str, tiles: str, args: argparse.Namespace) -> dict[str, float] | str:
    """CPU: memory from a child whose freed tensors leave the RSS (mmap threshold 64 KiB), time from
    one with glibc's default allocator (forced mmaps page-fault every temporary); CUDA: one child."""
    command = [
        sys.executable, __file__, "--case", impl, "--shapes", shape, "--device", args.device,
        "--dim", str(args.dim), "--repeat", str(args.repeat), "--precision", args.precision,
        "--skip-threshold", str(args.skip_threshold), "--tiles", tiles,
    ]
    if args.device == "cuda":
        runs = [("both", dict(os.environ))]
    else:
        runs = [("memory", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}), ("time", dict(os.environ))]
    merged: dict[str, float] = {}
    for measure, env in runs:
        child = subprocess.run(command + ["--measure", measure], env=env, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            lines = (child.stderr.strip() or child.stdout.strip() or "failed").splitlines()
            return "error: " + lines[-1][:100]
        merged.update(json.loads(child.stdout.strip().splitlines()[-1]))
    return merged


def live_tile_note(shape: str, tiles: TileConfig, args: argparse.Namespace) -> str:
    batch, classes = (int(n) for n in shape.split("x"))
    embeddings, weight, labels = embeddings_at_cosine(batch, classes, args.dim, COS_TARGET, device=args.device)
    stats = live_pairs(
        F.normalize(embeddings, dim=1), weight, labels, SFaceParams(), args.skip_threshold,
        tiles.block_b, tiles.block_c,
    )
    return f"live pairs {stats.pair_fraction:.1e}, live tiles {stats.tile_fraction:.1%}"


def benchmark_rows(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(label, impl, tiles) per row: one Triton row per ``--tiles`` entry."""
    tile_list = args.tiles_text.split(",")
    rows = []
    for impl in args.impls.split(","):
        if impl.startswith("triton") and len(tile_list) > 1:
            rows += [(f"{impl}@{tiles}", impl, tiles) for tiles in tile_list]
        else:
            rows.append((impl, impl, tile_list[0]))
    return rows


def benchmark(args: argparse.Namespace) -> None:
    """Every implementation at every shape; ``--rounds`` interleaved rounds, the fastest kept (shared machines)."""
    device = args.device
    print(f"# head shard fwd+bwd, D={args.dim}, SFace precision {args.precision}, median of {args.repeat}, "
          f"best of {args.rounds} round(s), {device}: "
          f"{torch.cuda.get_device_name() if device == 'cuda' else f'{os.cpu_count()} CPU cores'}; "
          f"torch {torch.__version__}" + (f", triton {__import__('triton').__version__}" if triton_available() else ""))
    rows = benchmark_rows(args)
    width = max(14, *(len(label) for label, _, _ in rows))
    print(f"{'shape':>14} {'impl':>{width}} {'ms':>10} {'x floor':>8} {'peak MiB':>10} {'excl. dW':>9}  note")
    for shape in args.shapes.split(","):
        grad_w_mib = int(shape.split("x")[1]) * args.dim * 4 / MIB
        results: dict[str, dict[str, float] | str] = {}
        for _ in range(args.rounds):
            for label, impl, tiles in rows:
                if isinstance(results.get(label), str):
                    continue
                result = skip_reason(impl, device) or run_in_child(impl, shape, tiles, args)
                previous = results.get(label)
                if isinstance(result, str) or previous is None or result["ms"] < previous["ms"]:
                    results[label] = result
        floor = results.get("floor")
        for label, impl, tiles in rows:
            result = results[label]
            if isinstance(result, str):
                print(f"{shape:>14} {label:>{width}} {'-':>10} {'-':>8} {'-':>10} {'-':>9}  {result}")
                continue
            ratio = f"{result['ms'] / floor['ms']:.2f}" if isinstance(floor, dict) else "-"
            if impl == "floor":
                excl, note = "-", "pre-cast operands; its dW-sized output is in the peak"
            else:
                excl, note = f"{result['peak_mib'] - grad_w_mib:.1f}", f"fp32 dW is {grad_w_mib:.0f} MiB"
            if impl == "triton-sparse":
                note += "; " + live_tile_note(shape, TileConfig.parse(tiles), args)
            ms, peak = result["ms"], result["peak_mib"]
            print(f"{shape:>14} {label:>{width}} {ms:>10.2f} {ratio:>8} {peak:>10.1f} {excl:>9}  {note}")


def embed_checkpoint(
    path: Path | None, reference: Path, rows: int, seed: int
) -> tuple[str, Tensor, Tensor, Tensor]:
    """(name, x̂, head weight, labels) of ``rows`` training images of checkpoint ``path``.

    ``path`` None: the untrained model of ``reference``'s run (its architecture, data and head).
    """
    from sface_dist.backbones import build_backbone
    from sface_dist.checkpoint import read_head_rows, read_model_config
    from sface_dist.data.datasets import RecordFaceDataset
    from sface_dist.data.pixels import normalize_pixels
    from sface_dist.evaluation.checkpoint_backbone import load_backbone

    config = read_model_config(path or reference)[0]
    model_cfg, data_cfg = config["model"], config["data"]
    dataset = RecordFaceDataset(data_cfg["root"], data_cfg["num_classes"], data_cfg["image_size"])
    num_classes = dataset.num_classes
    torch.manual_seed(seed)
    if path:
        backbone = load_backbone(path).model
        weight = read_head_rows(path)
    else:
        backbone = build_backbone(model_cfg["backbone"], model_cfg["embedding_size"]).eval()
        head = ShardedSFaceHead(num_classes, model_cfg["embedding_size"], impl="chunked")
        weight = head.weight.detach()
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:rows].tolist()
    images, labels = [], []
    for index in indices:
        label, encoded = dataset.read_encoded(index)
        pixels = torch.from_numpy(dataset.decode(index, encoded).copy()).permute(2, 0, 1).float()
        images.append(normalize_pixels(pixels))
        labels.append(label)
    with torch.no_grad():
        embeddings = torch.cat([backbone(torch.stack(images[i : i + 128])) for i in range(0, rows, 128)])
    run = (path or reference).parent.parent.name
    name = f"{run}/{path.name}" if path else f"{run}/random init"
    return name, F.normalize(embeddings, dim=1), weight, torch.tensor(labels)


DEFAULT_RUN = Path("runs/demo")
"""The run whose latest checkpoint ``--random-init`` alone (no checkpoints named) takes its architecture from."""


def measure_live_pairs(args: argparse.Namespace) -> None:
    from sface_dist.checkpoint import CheckpointError, resolve_checkpoint

    try:
        checkpoints = [resolve_checkpoint(p) for p in args.live_pairs]
        reference = checkpoints[0] if checkpoints else resolve_checkpoint(DEFAULT_RUN)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    paths: list[Path | None] = ([None] if args.random_init else []) + list(checkpoints)
    print(f"# live non-target pairs (r_inter > threshold) and live {args.tile} tiles; official SFace k=80 b=1.23")
    print(f"{'embeddings':>28} {'threshold':>9} {'live pairs':>10} {'live tiles':>10} "
          f"{'tile p50':>9} {'tile p90':>9} {'tile p99':>9} {'tile max':>9}")
    block_b, block_c = (int(n) for n in args.tile.split("x"))
    for path in paths:
        name, x_hat, weight, labels = embed_checkpoint(path, reference, args.rows, seed=0)
        for threshold in (1e-5, 1e-4, 1e-3):
            s = live_pairs(x_hat, weight, labels, SFaceParams(), threshold, block_b, block_c)
            p50, p90, p99, top = s.tile_quantiles
            print(f"{name:>28} {threshold:>9.0e} {s.pair_fraction:>10.2e} {s.tile_fraction:>10.1%} "
                  f"{p50:>9.2e} {p90:>9.2e} {p99:>9.2e} {top:>9.2e}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--shapes", default=None, help=f"BxC list (CUDA default {CUDA_SHAPES}; CPU {CPU_SHAPES})")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=None, help="timed iterations (default 20 CUDA, 3 CPU)")
    parser.add_argument("--precision", default=None, help="SFace matmul operands (default bf16 CUDA, fp32 CPU)")
    parser.add_argument("--skip-threshold", type=float, default=1e-4, help="sparse mode's skip threshold")
    parser.add_argument(
        "--tiles", dest="tiles_text", default=None,
        help="Triton tile(s) BxCxWARPSxSTAGES, comma-separated: one row each (the first is used by --case); "
        "default: the precision's default tiles",
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds, fastest kept")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="both", choices=("memory", "time", "both"), help=argparse.SUPPRESS)
    parser.add_argument("--live-pairs", nargs="*", default=[], metavar="CHECKPOINT", help="measure live pairs")
    parser.add_argument("--random-init", action="store_true", help="with --live-pairs: also the untrained model")
    parser.add_argument("--rows", type=int, default=1024, help="--live-pairs: images embedded")
    parser.add_argument("--tile", default="64x32", help="--live-pairs: BxC tile")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.shapes = args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)
    args.repeat = args.repeat or (20 if cuda else 3)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if args.tiles_text is None:
        args.tiles_text = CUDA_TILES[args.precision].label
    args.tiles = TileConfig.parse(args.tiles_text.split(",")[0])
    return args


def main() -> None:
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.shapes, args)))
    elif args.live_pairs or args.random_init:
        try:
            measure_live_pairs(args)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
