#!/usr/bin/env bash
# Every GPU-only check of the project in one command, sized for ~10 minutes on one H200:
#   1. versions of the GPU, torch and Triton;
#   2. the CUDA tests: fused kernels at full size against fp64, the torch loader's side-stream
#      copy against the CPU batches, and DALI's mixed decoder where DALI is installed;
#   3. tools/compile_kernels.py (registers, spills, shared memory under this Triton), then
#      tools/bench_head.py at its CUDA shapes, an MS1M and a WebFace42M shard on 8 GPUs (every
#      implementation, one table), and a bf16 tile sweep at 1,024 x 257,488 (large tiles that spill against small ones that do not);
#   4. tools/bench_train.py: samples/s of the whole training step for iresnet50 and iresnet100 at batch 128 with the
#      MS1M head (85,742 classes) on one GPU, against a peer-structured loop and the backbone alone (~1 minute);
#   5. the start-up self-checks, one verdict each: the fused SFace block in every precision at D=512
#      against the fp64 chunked block, and DALI's GPU decoder on the demo data's first batch
#      against the CPU decode (where DALI is installed);
#   6. 200 demo steps on one GPU with head.impl=auto (Triton) and head.impl=chunked, head in
#      bf16 as the GPU configs run it: the loss curves side by side and the step time each takes.
#   7. model.compile: vit_t and iresnet50 compiled by inductor against eager (same embeddings),
#      the compilation time and the training step time of each.
#   8. tools/plan_memory.py --measure: the planned peak of the MS1M step (iresnet100, bf16, Triton head, one GPU,
#      batch 64 and 128) against CUDA's measured peak of allocated bytes.
# Usage: tools/check_gpu.sh [RESULTS_DIR]   (default: runs/check_gpu; uses $PYTHON or python3)
# Each part writes its log under RESULTS_DIR and a failing part does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-runs/check_gpu}
python=${PYTHON:-python3}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

part() {  # part NAME COMMAND...: run, log to RESULTS_DIR/NAME.log, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    if ! "$@" 2>&1 | tee "$results/$name.log"; then
        failed+=("$name")
    fi
    echo "== $name: $((SECONDS - start)) s"
}

if ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: $python sees no CUDA device; this script checks the GPU paths only" >&2
    exit 2
fi

part versions "$python" -c "
import torch, triton, numpy
print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| triton', triton.__version__, '| numpy', numpy.__version__)"

part tests "$python" -m pytest -q -p no:cacheprovider -rs \
    tests/unit/test_kernels.py::test_full_size_on_gpu \
    tests/unit/test_loader.py::test_torch_backend_on_gpu_gives_the_cpu_batches \
    tests/unit/test_dali_backend.py::test_mixed_decoder_on_gpu_matches_cpu

part compile_kernels "$python" tools/compile_kernels.py
part bench_head "$python" tools/bench_head.py
part tile_sweep "$python" tools/bench_head.py --shapes 1024x257488 --impls floor,triton \
    --tiles 64x32x8x2,32x16x8x2,16x16x8x2,16x16x4x2
part bench_train "$python" tools/bench_train.py --warmup 5 --steps 10 --repeat 3

demo_data=$results/demo_data
if [[ ! -f $demo_data/train.rec ]]; then
    part demo_data "$python" tools/make_demo_data.py --out "$demo_data"
fi
part self_checks "$python" - "$demo_data" <<'EOF'
"""The verdicts of the start-up self-checks: the fused SFace block in every precision at D=512
(sface_dist/heads/self_check.py) and DALI's GPU decoder on the demo data (sface_dist/data/decoder_check.py)."""
import sys

import torch

from sface_dist.heads.self_check import TOLERANCES, check_triton_block

device = torch.device("cuda")
failed = 0
for precision in TOLERANCES:
    result = check_triton_block(precision, 512, device)
    print(f"triton block, D=512, {result.verdict}")
    failed += result.cause is not None
from sface_dist.data.dali import dali_available
if dali_available():
    from pathlib import Path

    from sface_dist.data.datasets import RecordFaceDataset
    from sface_dist.data.decoder_check import compare_batches, first_batches
    from sface_dist.data.sampler import EpochShardSampler

    root = Path(sys.argv[1])
    image_size = int((root / "property").read_text().split(",")[1])
    dataset = RecordFaceDataset(root, 0, image_size)
    sampler = EpochShardSampler(len(dataset), 128, 0, 1, 0, True, False, image_size)
    decoded, reference = first_batches(dataset, sampler, 4, device, skip_bad=False)
    cause = compare_batches(decoded, reference)
    levels = (decoded[0].cpu() - reference[0]).abs() * 127.5
    measured = f"|GPU - CPU| mean {levels.mean():.2f}, max {levels.max():.0f} grey levels"
    print(f"DALI mixed decoder, first demo batch: {'ok' if cause is None else 'FAILED: ' + cause} ({measured})")
    failed += cause is not None
else:
    print("DALI mixed decoder: not checked (DALI is not installed)")
sys.exit(1 if failed else 0)
EOF

for impl in auto chunked; do
    part "demo_$impl" "$python" -m torch.distributed.run --standalone --nproc_per_node=1 -m sface_dist.train \
        configs/demo.yaml --set data.root="$demo_data" --set eval.bins="[$demo_data/heldout.bin]" \
        --set data.num_workers=4 --set train.steps=200 --set train.log_every=10 --set eval.every=1000 \
        --set head.impl=$impl --set head.precision=bf16 --set train.output="$results/demo_$impl"
done
part demo_compare "$python" - "$results/demo_auto.log" "$results/demo_chunked.log" <<'EOF'
"""The two demo runs' loss and throughput, step by step, and the largest loss difference."""
import re
import sys

line = re.compile(r"^step (\d+)/\d+ loss (-?[0-9.]+) .* ([0-9.]+) samples/s", re.MULTILINE)
auto, chunked = ({int(m[1]): (float(m[2]), float(m[3])) for m in line.finditer(open(p).read())} for p in sys.argv[1:])
print(f"{'step':>5} {'loss auto':>10} {'loss chunked':>12} {'samples/s auto':>15} {'samples/s chunked':>17}")
for step in sorted(auto.keys() & chunked.keys()):
    print(f"{step:>5} {auto[step][0]:>10.4f} {chunked[step][0]:>12.4f} {auto[step][1]:>15.0f} {chunked[step][1]:>17.0f}")
gap = max((abs(auto[s][0] - chunked[s][0]) for s in auto.keys() & chunked.keys()), default=float("nan"))
print(f"largest loss difference: {gap:.4f}")
sys.exit(0 if auto and chunked else 1)
EOF

part compile "$python" - <<'EOF'
"""model.compile on the GPU: each backbone compiled by inductor against eager, compile and step times (bf16)."""
import copy
import time

import torch

from sface_dist.backbones import build_backbone, compile_backbone

images = torch.randn(128, 3, 112, 112, device="cuda")


def train_step(model: torch.nn.Module) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(images).float().square().mean().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


for name in ("vit_t", "iresnet50"):
    torch.manual_seed(0)
    eager = build_backbone(name).cuda().eval()
    compiled = compile_backbone(copy.deepcopy(eager))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference, out = eager(images).float(), compiled(images).float()
    error = ((out - reference).norm() / reference.norm()).item()
    eager.train(), compiled.train()
    first = train_step(compiled)
    times = {label: sorted(train_step(m) for _ in range(20))[10] for label, m in (("eager", eager), ("compiled", compiled))}
    print(f"{name}: eval embeddings relative difference {error:.1e}, first compiled training step {first:.1f} s, "
          f"step at batch 128: eager {1e3 * times['eager']:.1f} ms, compiled {1e3 * times['compiled']:.1f} ms")
    assert error < 2e-2, f"{name}: compiled embeddings differ from eager by {error:.1e}"
EOF

for batch in 64 128; do
    part "plan_memory_$batch" "$python" tools/plan_memory.py configs/ms1m.yaml --measure --set data.batch_size=$batch \
        --set train.output="$results/plan_memory_$batch"
done

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all GPU checks ran"
