"""Operand precision of the heads' matmuls (``head.precision``): fp32, TF32, bf16 or fp16, accumulated in fp32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from sface_dist.config import Precision, check_choice

LOW_PRECISION_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""Operand dtype of the precisions stored in fewer than 32 bits."""


def check_precision(precision: str) -> None:
    """Raise ValueError naming ``head.precision`` unless ``precision`` is one of ``Precision``."""
    check_choice(precision, Precision, "head.precision")


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """Allow TF32 tensor cores for fp32 CUDA matmuls inside the ``with`` only."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def matmul(a: Tensor, b: Tensor, precision: Precision) -> Tensor:
    """``a @ b`` with operands in ``precision`` and the result in ``a``'s dtype (fp32 accumulation)."""
    low = LOW_PRECISION_DTYPES.get(precision)
    if low is None or a.dtype == torch.float64:
        with _tf32(precision == "tf32"):
            return a @ b
    return (a.to(low) @ b.to(low)).to(a.dtype)
