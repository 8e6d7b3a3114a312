"""Start-up self-check of the fused SFace block on the GPU that is about to train with it.

The Triton kernels compile for each GPU, Triton version, operand precision and embedding size, and
only running them shows that they compile, launch and agree with the torch block there. Before the
first step, ``impl_choice.choose_impl`` for ``head.impl`` ``auto`` or ``triton`` on CUDA runs the fused block
once on a small trained-like shard (``probe.py``) in the run's ``head.precision`` and compares its
loss, diagnostics and both gradients with ``sface_block_chunked`` in fp64, within the bounds the
kernel tests hold the kernels to (``TOLERANCES``). On a failure ``auto`` trains with ``chunked``
after one warning line naming the cause; ``triton`` raises ``SelfCheckError`` with it
(docs/kernels.md, Self-check).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sface_dist.config import Precision
from sface_dist.heads.kernels.fused import sface_block_triton
from sface_dist.heads.probe import embeddings_at_cosine
from sface_dist.heads.sface import BlockOptions, SFaceParams, sface_block_chunked

TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 1e-4),
    "tf32": (1e-4, 4e-3),
    "fp16": (3e-4, 3e-3),
    "bf16": (1.5e-3, 3e-2),
}
"""(loss, gradient) relative error against fp64 on trained-like cosines, by ``head.precision``: the head's
bounds (tests/unit/test_heads.py), fp32 at 1e-4. On tensor cores tf32 rounds operands to 10 mantissa bits (unit
roundoff 2^-11, 8x finer than bf16's 2^-8), so its gradient bound is bf16's / 8. tests/unit/test_kernels.py holds
the kernels to these bounds (the interpreter runs tf32 as fp32, and there at fp32's)."""
COS_TARGET_TOLERANCE = 1e-5
"""Relative error of the target cosines, which every implementation takes in full precision."""
UNIT_ROUNDOFF: dict[str, float] = {"fp32": 2.0**-24, "tf32": 2.0**-11, "fp16": 2.0**-11, "bf16": 2.0**-8}
"""Of each operand type: a cosine of unit vectors from rounded operands is off by at most 2x this."""
CHECK_ROWS = 100
"""Rows of the check's shard: ragged for every tile height (16, 32, 64); a quarter labelled in another shard."""
CHECK_CLASSES = 250
"""Classes of the check's shard: ragged for every tile width (16, 32)."""
CHECK_COS_TARGET = 0.7
"""Target cosine of the check's rows (as the kernel tests): near θ = a, where r_intra is steepest."""


class SelfCheckError(ValueError):
    """``head.impl: triton`` where the fused block failed its self-check; the one-line message names the cause."""


@dataclass(frozen=True)
class SelfCheckResult:
    """What one self-check found."""

    precision: str
    seconds: float
    """Wall time of the check, compilation included."""
    errors: dict[str, float]
    """Each measured quantity's error against fp64 (empty when the block raised)."""
    cause: str | None
    """None: the block agrees; else one line: the exception, or which quantity disagreed by how much."""

    @property
    def verdict(self) -> str:
        """One line: ``ok`` with the errors, or ``FAILED`` with the cause."""
        if self.cause is not None:
            return f"{self.precision}: FAILED after {self.seconds:.1f} s: {self.cause}"
        measured = ", ".join(f"{name} {error:.2g}" for name, error in self.errors.items())
        return f"{self.precision}: ok in {self.seconds:.1f} s ({measured})"


def tolerances(precision: str) -> dict[str, tuple[float, str]]:
    """Each compared quantity's bound at ``precision`` and how it is measured, in the order they are checked."""
    loss, gradient = TOLERANCES[precision]
    return {
        "loss": (loss, "relative"),
        "intra": (loss, "relative"),
        "inter": (loss, "relative"),
        "cos_target": (COS_TARGET_TOLERANCE, "relative"),
        "max_nontarget": (1e-5 + 2.0 * UNIT_ROUNDOFF[precision], "absolute"),
        "grad_x": (gradient, "relative"),
        "grad_w": (gradient, "relative"),
    }


def _relative(actual: Tensor, expected: Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def check_shard(
    rows: int, classes: int, dim: int, device: torch.device, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(x̂ [rows, dim], weight [classes, dim], local labels [rows]) on ``device``: trained-like rows, every fourth
    one labelled in another shard (-1)."""
    embeddings, weight, labels = embeddings_at_cosine(rows, classes, dim, CHECK_COS_TARGET, seed=seed)
    local_labels = torch.where(torch.arange(rows) % 4 == 3, -1, labels)
    return F.normalize(embeddings, dim=1).to(device), weight.to(device), local_labels.to(device)


def measure_fused_block(
    precision: Precision, dim: int, device: torch.device, params: SFaceParams, rows: int, classes: int
) -> dict[str, float]:
    """Errors of ``sface_block_triton`` at ``precision`` against ``sface_block_chunked`` in fp64 on ``check_shard``."""
    x_hat, weight, local_labels = check_shard(rows, classes, dim, device)
    inv_batch = 1.0 / rows
    x64 = x_hat.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    reference = sface_block_chunked(x64, w64, local_labels, None, params, BlockOptions(inv_batch))
    reference.loss.backward()
    x = x_hat.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    fused = sface_block_triton(x, w, local_labels, None, params, BlockOptions(inv_batch, precision))
    fused.loss.backward()
    assert x.grad is not None and w.grad is not None and x64.grad is not None and w64.grad is not None
    return {
        "loss": _relative(fused.loss, reference.loss),
        "intra": _relative(fused.scalar_stats[0], reference.scalar_stats[0]),
        "inter": _relative(fused.scalar_stats[1], reference.scalar_stats[1]),
        "cos_target": _relative(fused.cos_target, reference.cos_target),
        "max_nontarget": (fused.max_nontarget.double() - reference.max_nontarget).abs().max().item(),
        "grad_x": _relative(x.grad, x64.grad),
        "grad_w": _relative(w.grad, w64.grad),
    }


def describe_exception(error: BaseException) -> str:
    """``Type: first line of the message`` (the type alone for an empty message)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def check_triton_block(
    precision: Precision,
    dim: int,
    device: torch.device,
    params: SFaceParams = SFaceParams(),
    rows: int = CHECK_ROWS,
    classes: int = CHECK_CLASSES,
) -> SelfCheckResult:
    """Run the fused block on ``device`` and compare it (see the module docstring); never raises for the block."""
    start = time.perf_counter()
    try:
        errors = measure_fused_block(precision, dim, device, params, rows, classes)
    except Exception as error:  # compilation, launch and device errors all mean: do not train with this block
        return SelfCheckResult(precision, time.perf_counter() - start, {}, describe_exception(error))
    cause = None
    for name, (tolerance, kind) in tolerances(precision).items():
        if not errors[name] <= tolerance:  # NaN disagrees too
            measured = errors[name]
            cause = f"{name} differs from the fp64 chunked block by {measured:.2g} ({kind}, tolerance {tolerance:g})"
            break
    return SelfCheckResult(precision, time.perf_counter() - start, errors, cause)
