"""``choose_impl``: the one place that decides which SFace block a head trains with, and says why.

``head.impl`` is ``dense`` or ``chunked`` (taken as configured), ``triton`` (the fused kernels, which need a CUDA
device or ``TRITON_INTERPRET=1``, and pass their self-check first on a GPU) or ``auto`` (``triton`` where CUDA and
Triton are here and the self-check passes, else ``chunked``). Collective where the self-check runs: every rank
takes the same implementation (``self_check.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from sface_dist.config import Precision, SFaceImpl, SFaceImplOrAuto, check_choice
from sface_dist.heads.kernels.fused import interpreter_enabled, triton_available
from sface_dist.heads.precision import check_precision
from sface_dist.heads.self_check import SelfCheckError, check_triton_block
from sface_dist.heads.sface import SFaceParams
from sface_dist.parallel.agreement import first_failure


@dataclass(frozen=True)
class ImplChoice:
    """The SFace block a head runs, and the reason in a few words."""

    asked: SFaceImplOrAuto
    impl: SFaceImpl
    reason: str
    fell_back: bool = False
    """``auto`` whose fused block failed its self-check: the line is a warning."""

    def line(self) -> str:
        """What rank 0 prints when the choice was not simply taken from the config."""
        if self.fell_back:
            return f"warning: head.impl={self.asked}: {self.reason}; training with head.impl={self.impl}"
        return f"head.impl={self.asked}: SFace block runs {self.impl!r} ({self.reason})"

    @property
    def worth_saying(self) -> bool:
        return self.asked != self.impl or self.asked == "triton"


def self_check_device(impl: SFaceImplOrAuto) -> torch.device | None:
    """The GPU the fused block is about to train on when ``impl`` asks for it (``auto``, ``triton``) and CUDA and
    Triton are here; None: no self-check (the block will not run on a GPU)."""
    if impl not in ("auto", "triton") or not (torch.cuda.is_available() and triton_available()):
        return None
    return torch.device("cuda", torch.cuda.current_device())


def _without_gpu(asked: SFaceImplOrAuto) -> ImplChoice:
    """The choice where no self-check runs."""
    if asked in ("dense", "chunked"):
        return ImplChoice(asked, asked, "as configured")
    if asked == "triton":
        if not triton_available():
            raise ValueError("head.impl=triton: Triton is not installed (pip install -e '.[triton]'); "
                             "head.impl=auto trains with chunked here")
        if not interpreter_enabled():
            raise ValueError("head.impl=triton: the fused kernels need a CUDA device (or TRITON_INTERPRET=1 to "
                             "interpret them on the CPU, for tests); head.impl=auto trains with chunked here")
        return ImplChoice(asked, "triton", "TRITON_INTERPRET=1: interpreted on the CPU")
    return ImplChoice(asked, "chunked", "Triton not installed" if torch.cuda.is_available() else "no CUDA device")


def choose_impl(
    asked: SFaceImplOrAuto, precision: Precision, dim: int, params: SFaceParams, process_group: ProcessGroup | None,
    sub_centers: int = 1,
) -> ImplChoice:
    """The implementation for ``head.impl`` = ``asked`` on this machine (see the module docstring).

    Where the self-check runs and fails, ``auto`` falls back to ``chunked`` with the cause found on the lowest
    failing rank, and ``triton`` raises ``SelfCheckError`` there (``PeerError`` on the other ranks). The fused
    kernels score one centre a class: with sub-centres ``auto`` is ``chunked``.
    """
    check_choice(asked, SFaceImplOrAuto, "head.impl")
    check_precision(precision)
    if sub_centers > 1 and asked == "auto":
        return ImplChoice(asked, "chunked", f"head.sub_centers {sub_centers}: the fused kernels score one centre "
                                            f"a class")
    device = self_check_device(asked)
    if device is None:
        return _without_gpu(asked)
    result = check_triton_block(precision, dim, device, params)
    failure = first_failure(result.cause, process_group)
    if failure is None:
        return ImplChoice(asked, "triton", f"its {precision} self-check passed in {result.seconds:.1f} s")
    summary = f"the Triton SFace block failed its {precision} self-check{failure.where}: {failure.cause}"
    if asked == "triton":
        error = SelfCheckError(f"head.impl=triton: {summary} (head.impl=auto would train with chunked)")
        failure.raise_here(error, summary, process_group)
    return ImplChoice(asked, "chunked", summary, fell_back=True)
