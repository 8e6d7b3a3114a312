"""The Triton SFace kernels against the fp64 references.

On CPU the kernels run under ``TRITON_INTERPRET=1`` in one worker process (this file run
as a script): the variable must be set before Triton compiles the kernels and would turn
every later CUDA kernel of this pytest process into an interpreted one. The worker computes
every case once and returns the measured errors; each test asserts on its cases. On a GPU
the same cases run in-process at full size (``test_full_size_on_gpu``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from sface_dist.heads import ShardedSFaceHead  # noqa: E402
from sface_dist.heads.kernels.fused import CUDA_TILES, TileConfig, sface_block_triton, triton_available  # noqa: E402
from sface_dist.heads.kernels.offline_compile import SHARED_MEMORY_LIMIT, compile_kernels  # noqa: E402
from sface_dist.heads.sface import BlockOptions, SFaceParams, sface_block_chunked, sface_block_dense  # noqa: E402

from sface_reference import relative_error, sface_reference  # noqa: E402

OFFICIAL = SFaceParams(s=64.0, k=80.0, a=0.80, b=1.23)
SOFT = SFaceParams(s=64.0, k=8.0, a=0.8, b=1.23)
PRECISION_TOLERANCES = {"fp32": (1e-4, 1e-4), "tf32": (1e-4, 1e-4), "fp16": (3e-4, 3e-3), "bf16": (1.5e-3, 3e-2)}
"""(loss, gradient) relative error vs fp64 on trained-like cosines: tests/test_heads.py's bounds, fp32 at 1e-4.
The interpreter runs tf32 as fp32."""
GPU_TOLERANCES = {**PRECISION_TOLERANCES, "tf32": (1e-4, 4e-3)}
"""On tensor cores tf32 rounds operands to 10 mantissa bits (unit roundoff 2^-11, 8x finer than bf16's 2^-8), so its
gradient bound is bf16's / 8 — expected well above 1e-4, as bf16's measured error (4e-3) is about its roundoff."""
SPARSE_THRESHOLD = 1e-4
SPARSE_GRAD_TOLERANCE = 2e-4
"""~10x the relative gradient error measured at skip_threshold=1e-4 on this case (docs/kernels.md)."""

Errors = dict[str, float]


def trained_like(batch: int, classes: int, dim: int, cos_target: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Embeddings at a chosen target cosine from random centres, like a head mid-training (cf. test_heads)."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    noise = torch.randn(batch, dim, generator=gen)
    noise = F.normalize(noise - (noise * centres[labels]).sum(1, keepdim=True) * centres[labels], dim=1)
    cos = (cos_target + 0.08 * torch.randn(batch, 1, generator=gen)).clamp(-1, 1)
    embeddings = cos * centres[labels] + (1 - cos**2).sqrt() * noise
    return embeddings * 10, centres * 3, labels


def block_errors(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    local_labels: torch.Tensor,
    inter_scale: torch.Tensor | None,
    params: SFaceParams,
    precision: str = "fp32",
    skip_threshold: float = 0.0,
) -> Errors:
    """Triton block vs the dense block in fp64 (labels may lie outside the block: -1)."""
    inv_batch = 1.0 / embeddings.shape[0]
    x64 = F.normalize(embeddings.double(), dim=1).requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    scale64 = None if inter_scale is None else inter_scale.double()
    ref = sface_block_dense(x64, w64, local_labels, scale64, params, BlockOptions(inv_batch))
    ref.loss.backward()
    x = F.normalize(embeddings.float(), dim=1).requires_grad_(True)
    w = weight.detach().float().clone().requires_grad_(True)
    options = BlockOptions(inv_batch, precision)
    out = sface_block_triton(x, w, local_labels, inter_scale, params, options, skip_threshold)
    out.loss.backward()
    return {
        "loss": relative_error(out.loss, ref.loss),
        "grad_x": relative_error(x.grad, x64.grad),
        "grad_w": relative_error(w.grad, w64.grad),
        "stats": relative_error(out.scalar_stats, ref.scalar_stats),
        "cos_target": relative_error(out.cos_target, ref.cos_target),
        "max_nontarget": (out.max_nontarget.double() - ref.max_nontarget).abs().max().item(),
    }


def head_errors(
    embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, params: SFaceParams, precision: str
) -> Errors:
    """The head with ``impl=triton`` vs the independent fp64 formula (tests/sface_reference.py)."""
    kwargs = dict(s=params.s, k=params.k, a=params.a, b=params.b)
    x64 = embeddings.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = sface_reference(x64, w64, labels, **kwargs)
    ref["loss"].backward()
    head = ShardedSFaceHead(weight.shape[0], weight.shape[1], impl="triton", precision=precision, **kwargs)
    with torch.no_grad():
        head.weight.copy_(weight)
    x = embeddings.clone().requires_grad_(True)
    out = head(x, labels)
    out.loss.backward()
    names = ("loss", "intra", "inter", "cos_target", "cos_nontarget", "accuracy")
    errors = {name: relative_error(getattr(out, name), ref[name]) for name in names}
    errors.update(grad_x=relative_error(x.grad, x64.grad), grad_w=relative_error(head.weight.grad, w64.grad))
    return errors


def ragged_problem(batch: int, classes: int, dim: int, outside: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Rows near their centres, a share ``outside`` of them labelled in another shard (-1)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    embeddings = weight[labels] + 0.9 * torch.randn(batch, dim, generator=gen)
    local = torch.where(torch.rand(batch, generator=gen) < outside, -1, labels)
    return embeddings, weight, local


def all_easy() -> tuple[torch.Tensor, ...]:
    """Targets at θ≈0, non-targets orthogonal: every weight saturates towards 0."""
    labels = torch.arange(20) % 17
    weight = torch.eye(17, 32) + 0.01 * torch.randn(17, 32, generator=torch.Generator().manual_seed(0))
    return torch.eye(17, 32)[labels] * 2.0, weight, labels


def all_hard() -> tuple[torch.Tensor, ...]:
    """Every row sits on another class's centre among near-duplicate centres: r_intra and r_inter near 1."""
    gen = torch.Generator().manual_seed(4)
    base = F.normalize(torch.randn(1, 32, generator=gen), dim=1)
    weight = base + 0.05 * torch.randn(19, 32, generator=gen)
    targets = torch.randint(0, 19, (21,), generator=gen)
    embeddings = weight[(targets + 1) % 19] * 3.0
    return embeddings, weight, targets


def sparse_errors() -> Errors:
    """Sparse mode vs exact mode vs fp64 on trained-like cosines (official parameters)."""
    embeddings, weight, labels = trained_like(48, 160, 256, 0.7, seed=1)
    exact = block_errors(embeddings, weight, labels, None, OFFICIAL)
    sparse = block_errors(embeddings, weight, labels, None, OFFICIAL, skip_threshold=SPARSE_THRESHOLD)
    return {**{f"exact_{k}": v for k, v in exact.items()}, **{f"sparse_{k}": v for k, v in sparse.items()}}


CASES: dict[str, Callable[[], Errors]] = {
    "ragged-outside-soft": lambda: block_errors(*ragged_problem(37, 45, 24, 0.3, seed=0), None, SOFT),
    "ragged-outside-official": lambda: block_errors(*ragged_problem(37, 45, 24, 0.3, seed=1), None, OFFICIAL),
    "inter-scale": lambda: block_errors(
        *ragged_problem(29, 51, 40, 0.2, seed=2),
        1.0 + 3.0 * torch.rand(51, generator=torch.Generator().manual_seed(9)),
        SOFT,
    ),
    "all-easy": lambda: block_errors(*all_easy(), None, OFFICIAL),
    "all-hard": lambda: block_errors(*all_hard(), None, OFFICIAL),
    **{
        f"head-{precision}": lambda precision=precision: head_errors(
            *trained_like(40, 120, 64, 0.7), OFFICIAL, precision
        )
        for precision in PRECISION_TOLERANCES
    },
    "sparse": sparse_errors,
}


def run_cases() -> dict[str, Errors]:
    torch.manual_seed(0)
    return {name: case() for name, case in CASES.items()}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Errors]:
    """Every case under the Triton interpreter, in one child process."""
    if not triton_available():
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["ragged-outside-soft", "ragged-outside-official", "inter-scale", "all-hard"])
def test_block_matches_fp64(interpreted: dict[str, Errors], case: str) -> None:
    errors = interpreted[case]
    for name in ("loss", "grad_x", "grad_w", "stats", "cos_target"):
        assert errors[name] < 1e-4, (name, errors)
    assert errors["max_nontarget"] < 1e-5, errors


def test_all_easy_rows(interpreted: dict[str, Errors]) -> None:
    """Gradients ~1e-12: relative errors of near-zero gradients are noise, the loss must still match."""
    errors = interpreted["all-easy"]
    assert errors["loss"] < 1e-4 and errors["stats"] < 1e-4 and errors["max_nontarget"] < 1e-5, errors


@pytest.mark.parametrize("precision", list(PRECISION_TOLERANCES))
def test_head_precision_against_fp64(interpreted: dict[str, Errors], precision: str) -> None:
    loss_tol, grad_tol = PRECISION_TOLERANCES[precision]
    errors = interpreted[f"head-{precision}"]
    assert errors["loss"] < loss_tol and errors["intra"] < loss_tol and errors["inter"] < loss_tol, errors
    assert errors["grad_x"] < grad_tol and errors["grad_w"] < grad_tol, errors
    assert errors["cos_target"] < 1e-5 and errors["accuracy"] == 0.0, errors


def test_sparse_mode_error_is_bounded(interpreted: dict[str, Errors]) -> None:
    """Skipping moves the gradients (tiles were skipped) but within the documented bound; the loss stays exact."""
    errors = interpreted["sparse"]
    assert errors["sparse_loss"] < 1e-4 and errors["sparse_stats"] < 1e-4, errors
    assert errors["sparse_grad_x"] > 10 * errors["exact_grad_x"], "nothing was skipped: the case tests nothing"
    assert errors["sparse_grad_x"] < SPARSE_GRAD_TOLERANCE and errors["sparse_grad_w"] < SPARSE_GRAD_TOLERANCE, errors


def test_falls_back_to_chunked_without_a_device() -> None:
    """On CPU tensors without the interpreter the block is the chunked one, bit for bit."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernels on CPU")
    embeddings, weight, labels = ragged_problem(9, 13, 16, 0.3, seed=3)
    x_hat = F.normalize(embeddings, dim=1)
    options = BlockOptions(1 / 9)
    fused = sface_block_triton(x_hat, weight, labels, None, OFFICIAL, options)
    chunked = sface_block_chunked(x_hat, weight, labels, None, OFFICIAL, options)
    assert torch.equal(fused.loss, chunked.loss) and torch.equal(fused.scalar_stats, chunked.scalar_stats)


def test_auto_picks_chunked_on_cpu_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine picks triton")
    assert ShardedSFaceHead(10, 8, impl="auto").impl == "chunked"
    assert "runs 'chunked'" in capsys.readouterr().out


@pytest.mark.parametrize("precision", sorted(CUDA_TILES))
def test_default_tiles_compile_for_hopper_within_its_limits(precision: str) -> None:
    """Both kernels, exact and sparse with scales, compiled for sm_90 with the Triton wheel's ptxas (no GPU
    needed): a block asking for more shared memory than Hopper has fails at launch."""
    for sparse in (False, True):
        for kernel in compile_kernels(CUDA_TILES[precision], precision, sparse=sparse, has_scale=sparse):
            assert kernel.shared_bytes <= SHARED_MEMORY_LIMIT[90], kernel
            assert kernel.registers <= 255, kernel


def test_offline_compile_sees_a_tile_that_cannot_launch() -> None:
    """64 x 32 tiles with tf32 operands: the ∂x̂ kernel's W tiles double-buffered in fp32 take 256 KiB."""
    _, grad_embedding = compile_kernels(TileConfig(64, 32, num_warps=8, num_stages=2), "tf32")
    assert grad_embedding.shared_bytes == 256 * 1024 > SHARED_MEMORY_LIMIT[90]


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and Triton")
def test_full_size_on_gpu() -> None:
    """Compiled kernels at training shapes: 1,000 rows (ragged), 20,011 classes, D=512, every precision,
    with and without Partial-FC scales, and sparse mode."""
    device = torch.device("cuda")
    embeddings, weight, labels = (t.to(device) for t in trained_like(1000, 20011, 512, 0.7))
    local = torch.where(labels % 7 == 0, -1, labels)
    inter_scale = torch.rand(20011, device=device) + 1.0
    for precision, (loss_tol, grad_tol) in GPU_TOLERANCES.items():
        for scale in (None, inter_scale):
            errors = block_errors(embeddings, weight, local, scale, OFFICIAL, precision)
            assert errors["loss"] < loss_tol and errors["stats"] < loss_tol, (precision, errors)
            assert errors["grad_x"] < grad_tol and errors["grad_w"] < grad_tol, (precision, errors)
            assert errors["cos_target"] < 1e-5, (precision, errors)
    exact = block_errors(embeddings, weight, local, None, OFFICIAL)
    assert exact["max_nontarget"] < 1e-5, exact
    sparse = block_errors(embeddings, weight, local, None, OFFICIAL, skip_threshold=SPARSE_THRESHOLD)
    assert sparse["loss"] < 1e-4 and sparse["stats"] < 1e-4, sparse
    assert sparse["grad_x"] < SPARSE_GRAD_TOLERANCE and sparse["grad_w"] < SPARSE_GRAD_TOLERANCE, sparse


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker runs under the Triton interpreter"
    print(json.dumps(run_cases()))
