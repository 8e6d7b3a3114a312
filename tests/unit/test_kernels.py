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
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from sface_dist.config import HeadConfig
from sface_dist.heads import ShardedSFaceHead, build_head
from sface_dist.heads.kernels.fused import CUDA_TILES, TileConfig, sface_block_triton, triton_available
from sface_dist.heads.kernels.offline_compile import SHARED_MEMORY_LIMIT, compile_kernels
from sface_dist.heads.probe import embeddings_at_cosine
from sface_dist.heads.self_check import TOLERANCES
from sface_dist.heads.sface import BlockOptions, SFaceParams, sface_block_chunked, sface_block_dense

from sface_reference import relative_error, sface_reference
from triton_interpreter import interpreted_results

OFFICIAL = SFaceParams(s=64.0, k=80.0, a=0.80, b=1.23)
SOFT = SFaceParams(s=64.0, k=8.0, a=0.8, b=1.23)
GPU_TOLERANCES = TOLERANCES
"""(loss, gradient) relative error vs fp64 on trained-like cosines, which the start-up self-check holds the kernels to
too (``sface_dist/heads/self_check.py``)."""
PRECISION_TOLERANCES = {**GPU_TOLERANCES, "tf32": GPU_TOLERANCES["fp32"]}
"""The interpreter runs tf32 as fp32."""
SPARSE_THRESHOLD = 1e-4
SPARSE_GRAD_TOLERANCE = 2e-4
"""~10x the relative gradient error measured at skip_threshold=1e-4 on this case (docs/kernels.md)."""

Errors = dict[str, float]
PARAMETER_SETS = {"official": OFFICIAL, "soft": SOFT}


@dataclass(frozen=True)
class KernelCase:
    """One comparison the worker runs."""

    inputs: str
    """What it feeds the kernels (rows, shapes, seed, parameters, precision), named in failure messages."""
    measure: Callable[[], Errors]


def describe(**inputs: object) -> str:
    return ", ".join(f"{key}={value}" for key, value in inputs.items())


def describe_params(name: str) -> str:
    params = PARAMETER_SETS[name]
    return f"{name} (s={params.s:g} k={params.k:g} a={params.a:g} b={params.b:g})"


def assert_below(label: str, errors: Errors, tolerances: dict[str, float]) -> None:
    """Each named error under its tolerance; a failure names the case and its inputs, the error and the tolerance."""
    for name, tolerance in tolerances.items():
        assert errors[name] < tolerance, f"{label}: {name} error {errors[name]:.3g}, tolerance {tolerance:g}"


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
    """The head with ``impl=triton`` vs the independent fp64 formula (tests/support/sface_reference.py)."""
    kwargs = dict(s=params.s, k=params.k, a=params.a, b=params.b)
    x64 = embeddings.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = sface_reference(x64, w64, labels, **kwargs)
    ref["loss"].backward()
    head = ShardedSFaceHead(weight.shape[0], weight.shape[1], params, impl="triton", precision=precision)
    with torch.no_grad():
        head.weight.copy_(weight)
    x = embeddings.clone().requires_grad_(True)
    out = head(x, labels)
    out.loss.backward()
    names = ("loss", "intra", "inter", "cos_target", "cos_nontarget", "accuracy")
    values = {**vars(out), **out.diagnostics}
    errors = {name: relative_error(values[name], ref[name]) for name in names}
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


def all_easy(batch: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Targets at θ≈0, non-targets orthogonal: every weight saturates towards 0."""
    labels = torch.arange(batch) % classes
    weight = torch.eye(classes, dim) + 0.01 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed))
    return torch.eye(classes, dim)[labels] * 2.0, weight, labels


def all_hard(batch: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Every row sits on another class's centre among near-duplicate centres: r_intra and r_inter near 1."""
    gen = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(1, dim, generator=gen), dim=1)
    weight = base + 0.05 * torch.randn(classes, dim, generator=gen)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    embeddings = weight[(targets + 1) % classes] * 3.0
    return embeddings, weight, targets


def ragged_case(
    params: str, batch: int, classes: int, dim: int, outside: float, seed: int, scale_seed: int | None = None
) -> KernelCase:
    """Ragged rows; with ``scale_seed``, Partial-FC weights 1 + 3·U(0, 1) on the negative terms."""

    def measure() -> Errors:
        inter_scale = None
        if scale_seed is not None:
            inter_scale = 1.0 + 3.0 * torch.rand(classes, generator=torch.Generator().manual_seed(scale_seed))
        return block_errors(*ragged_problem(batch, classes, dim, outside, seed), inter_scale, PARAMETER_SETS[params])

    scale = "none" if scale_seed is None else f"1+3*U(0,1) seed {scale_seed}"
    inputs = describe(
        rows="ragged", B=batch, C=classes, D=dim, outside=outside, seed=seed, inter_scale=scale,
        params=describe_params(params), precision="fp32",
    )
    return KernelCase(inputs, measure)


def geometry_case(rows: str, batch: int, classes: int, dim: int, seed: int) -> KernelCase:
    """``all_easy`` or ``all_hard`` rows, official parameters."""
    problem = {"all-easy": all_easy, "all-hard": all_hard}[rows]
    params = describe_params("official")
    inputs = describe(rows=rows, B=batch, C=classes, D=dim, seed=seed, params=params, precision="fp32")
    return KernelCase(inputs, lambda: block_errors(*problem(batch, classes, dim, seed), None, OFFICIAL))


def head_case(precision: str, batch: int, classes: int, dim: int, cos_target: float, seed: int) -> KernelCase:
    """The whole head (``impl=triton``) at ``precision`` on trained-like rows against the fp64 formula."""
    inputs = describe(
        rows="trained-like", B=batch, C=classes, D=dim, cos_target=cos_target, seed=seed,
        params=describe_params("official"), precision=precision,
    )

    def measure() -> Errors:
        return head_errors(*embeddings_at_cosine(batch, classes, dim, cos_target, seed=seed), OFFICIAL, precision)

    return KernelCase(inputs, measure)


def sparse_case(batch: int, classes: int, dim: int, cos_target: float, seed: int) -> KernelCase:
    """Sparse mode vs exact mode vs fp64 on trained-like rows (official parameters)."""

    def measure() -> Errors:
        embeddings, weight, labels = embeddings_at_cosine(batch, classes, dim, cos_target, seed=seed)
        exact = block_errors(embeddings, weight, labels, None, OFFICIAL)
        sparse = block_errors(embeddings, weight, labels, None, OFFICIAL, skip_threshold=SPARSE_THRESHOLD)
        return {**{f"exact_{k}": v for k, v in exact.items()}, **{f"sparse_{k}": v for k, v in sparse.items()}}

    inputs = describe(
        rows="trained-like", B=batch, C=classes, D=dim, cos_target=cos_target, seed=seed,
        params=describe_params("official"), precision="fp32", skip_threshold=SPARSE_THRESHOLD,
    )
    return KernelCase(inputs, measure)


CASES: dict[str, KernelCase] = {
    "ragged-outside-soft": ragged_case("soft", 37, 45, 24, outside=0.3, seed=0),
    "ragged-outside-official": ragged_case("official", 37, 45, 24, outside=0.3, seed=1),
    "inter-scale": ragged_case("soft", 29, 51, 40, outside=0.2, seed=2, scale_seed=9),
    "all-easy": geometry_case("all-easy", 20, 17, 32, seed=0),
    "all-hard": geometry_case("all-hard", 21, 19, 32, seed=4),
    **{
        f"head-{precision}": head_case(precision, 40, 120, 64, cos_target=0.7, seed=0)
        for precision in PRECISION_TOLERANCES
    },
    "sparse": sparse_case(48, 160, 256, cos_target=0.7, seed=1),
}


def run_cases() -> dict[str, Errors]:
    torch.manual_seed(0)
    return {name: case.measure() for name, case in CASES.items()}


def label(case: str) -> str:
    """The case's name and inputs, as assertion messages start."""
    return f"{case} ({CASES[case].inputs})"


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Errors]:
    """Every case under the Triton interpreter, in one child process."""
    return interpreted_results(__file__, timeout_s=600)


@pytest.mark.parametrize("case", ["ragged-outside-soft", "ragged-outside-official", "inter-scale", "all-hard"])
def test_block_matches_fp64(interpreted: dict[str, Errors], case: str) -> None:
    tolerances = dict.fromkeys(("loss", "grad_x", "grad_w", "stats", "cos_target"), 1e-4)
    assert_below(label(case), interpreted[case], {**tolerances, "max_nontarget": 1e-5})


def test_all_easy_rows(interpreted: dict[str, Errors]) -> None:
    """Gradients ~1e-12: relative errors of near-zero gradients are noise, the loss must still match."""
    assert_below(label("all-easy"), interpreted["all-easy"], {"loss": 1e-4, "stats": 1e-4, "max_nontarget": 1e-5})


@pytest.mark.parametrize("precision", list(PRECISION_TOLERANCES))
def test_head_precision_against_fp64(interpreted: dict[str, Errors], precision: str) -> None:
    loss_tol, grad_tol = PRECISION_TOLERANCES[precision]
    case = f"head-{precision}"
    errors = interpreted[case]
    tolerances = {"loss": loss_tol, "intra": loss_tol, "inter": loss_tol, "grad_x": grad_tol, "grad_w": grad_tol}
    assert_below(label(case), errors, {**tolerances, "cos_target": 1e-5})
    assert errors["accuracy"] == 0.0, f"{label(case)}: accuracy error {errors['accuracy']:.3g}, expected exactly 0"


def test_sparse_mode_error_is_bounded(interpreted: dict[str, Errors]) -> None:
    """Skipping moves the gradients (tiles were skipped) but within the documented bound; the loss stays exact."""
    errors = interpreted["sparse"]
    assert_below(label("sparse"), errors, {"sparse_loss": 1e-4, "sparse_stats": 1e-4})
    assert errors["sparse_grad_x"] > 10 * errors["exact_grad_x"], (
        f"{label('sparse')}: sparse grad_x error {errors['sparse_grad_x']:.3g} is not above 10x the exact mode's "
        f"{errors['exact_grad_x']:.3g}: nothing was skipped, the case tests nothing"
    )
    tolerances = dict.fromkeys(("sparse_grad_x", "sparse_grad_w"), SPARSE_GRAD_TOLERANCE)
    assert_below(label("sparse"), errors, tolerances)


def test_refuses_cpu_tensors_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused block never stands in silently for another: on CPU tensors without the interpreter it says so
    in one line (``impl_choice.choose_impl`` refuses ``head.impl=triton`` there before any step)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    embeddings, weight, labels = ragged_problem(9, 13, 16, 0.3, seed=3)
    with pytest.raises(ValueError, match=r"^the Triton SFace block needs CUDA tensors \(got cpu\)"):
        sface_block_triton(F.normalize(embeddings, dim=1), weight, labels, None, OFFICIAL, BlockOptions(1 / 9))


def test_an_empty_shard_is_the_chunked_blocks_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard without classes (or a batch without rows) has nothing to tile: the result is the chunked block's,
    bit for bit."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    embeddings, weight, labels = ragged_problem(9, 13, 16, 0.3, seed=3)
    x_hat, no_classes = F.normalize(embeddings, dim=1), weight[:0]
    local_labels = torch.full_like(labels, -1)
    options = BlockOptions(1 / 9)
    fused = sface_block_triton(x_hat, no_classes, local_labels, None, OFFICIAL, options)
    chunked = sface_block_chunked(x_hat, no_classes, local_labels, None, OFFICIAL, options)
    assert torch.equal(fused.loss, chunked.loss) and torch.equal(fused.scalar_stats, chunked.scalar_stats)


def test_auto_picks_chunked_on_cpu_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine picks triton")
    assert build_head(HeadConfig(impl="auto"), 10, 8, process_group=None).impl == "chunked"
    assert capsys.readouterr().out == "head.impl=auto: SFace block runs 'chunked' (no CUDA device)\n"


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
    batch, classes, dim, cos_target = 1000, 20011, 512, 0.7
    problem = embeddings_at_cosine(batch, classes, dim, cos_target)
    embeddings, weight, labels = (t.to(device) for t in problem)
    local = torch.where(labels % 7 == 0, -1, labels)
    inter_scale = torch.rand(classes, device=device) + 1.0
    inputs = describe(
        rows="trained-like", B=batch, C=classes, D=dim, cos_target=cos_target, seed=0,
        outside="labels divisible by 7", params=describe_params("official"),
    )
    for precision, (loss_tol, grad_tol) in GPU_TOLERANCES.items():
        for scale in (None, inter_scale):
            errors = block_errors(embeddings, weight, local, scale, OFFICIAL, precision)
            case = f"full-size ({inputs}, precision={precision}, inter_scale={'none' if scale is None else '1+U(0,1)'})"
            tolerances = {"loss": loss_tol, "stats": loss_tol, "grad_x": grad_tol, "grad_w": grad_tol}
            assert_below(case, errors, {**tolerances, "cos_target": 1e-5})
    exact = block_errors(embeddings, weight, local, None, OFFICIAL)
    assert_below(f"full-size ({inputs}, precision=fp32)", exact, {"max_nontarget": 1e-5})
    sparse = block_errors(embeddings, weight, local, None, OFFICIAL, skip_threshold=SPARSE_THRESHOLD)
    tolerances = {"loss": 1e-4, "stats": 1e-4, "grad_x": SPARSE_GRAD_TOLERANCE, "grad_w": SPARSE_GRAD_TOLERANCE}
    assert_below(f"full-size ({inputs}, precision=fp32, skip_threshold={SPARSE_THRESHOLD})", sparse, tolerances)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker runs under the Triton interpreter"
    print(json.dumps(run_cases()))
