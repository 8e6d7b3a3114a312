"""Compile the SFace kernels for a GPU architecture on a machine without one, and read their resources.

Triton compiles to a cubin with the ``ptxas`` its wheel carries, so whether a tile shape
compiles for Hopper, how many registers it takes, how many bytes it spills to local memory
and how much shared memory it asks for are known before any GPU runs it. A kernel that asks
for more shared memory than a block may have fails at launch; spills cost local-memory
traffic. ``tools/compile_kernels.py`` prints these for any tile shapes; ``tests/unit/test_kernels.py``
holds the default tiles to the hardware limits.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sface_dist.heads.kernels.fused import TileConfig, kernel_constants

SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}
"""Largest shared memory one block may use, in bytes, by compute capability (CUDA programming guide)."""

_OPERAND_TYPES = {"fp32": "*fp32", "tf32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
_SCALAR_TYPES = {
    "num_rows": "i32", "num_classes": "i32", "dim": "i32", "num_tiles_b": "i32", "num_tiles_c": "i32",
    "tiles_per_split": "i32", "k": "fp32", "b": "fp32", "grad_scale": "fp32", "skip_threshold": "fp32",
}  # fmt: skip


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel takes per block."""

    kernel: str
    registers: int
    """Per thread (255 is the most a thread may have)."""
    spill_bytes: int
    """Per-thread stack in local memory: register spills (0 is the goal)."""
    loop_spill_instructions: int
    """Local-memory loads and stores (SASS ``LDL``/``STL``) inside loops: the spills paid every iteration."""
    shared_bytes: int


class OfflineCompileError(RuntimeError):
    """A kernel does not compile for the target (the message carries ptxas' reason)."""


def compile_kernels(
    tiles: TileConfig,
    precision: str,
    dim: int = 512,
    sparse: bool = False,
    has_scale: bool = False,
    capability: int = 90,
) -> list[KernelResources]:
    """Compile both kernels, specialised as ``sface_block_triton`` launches them, for ``sm_<capability>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sface_dist.heads.kernels.triton_sface import _grad_embedding_kernel, _grad_weight_kernel

    constants = kernel_constants(tiles, precision, dim, has_scale, sparse, emulate=False)
    options = {name: constants.pop(name) for name in ("num_warps", "num_stages", "enable_fp_fusion")}
    pointer_types = {"x_ptr": _OPERAND_TYPES[precision], "labels_ptr": "*i64", "live_ptr": "*i8" if sparse else "*fp32"}
    target = GPUTarget("cuda", capability, 32)
    backend = triton.compiler.make_backend(target)
    cuobjdump = _cuobjdump(triton)
    resources = []
    for kernel in (_grad_weight_kernel, _grad_embedding_kernel):
        signature = {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            else:
                signature[name] = _SCALAR_TYPES.get(name) or pointer_types.get(name, "*fp32")
        # Launches see 16-byte aligned tensors (torch allocations): the same hint the JIT gives them.
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name.endswith("_ptr")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
        try:
            compiled = triton.compile(source, target=target, options=backend.parse_options(options).__dict__)
        except Exception as error:  # Triton raises its own error types, which differ between versions
            fatal = [line for line in str(error).splitlines() if "ptxas" in line and "fatal" in line]
            reason = fatal[0] if fatal else str(error)[:300]
            raise OfflineCompileError(f"{kernel.__name__} at {tiles.label}: {reason}") from None
        registers, spill_bytes, loop_spills = _register_use(compiled.asm["cubin"], cuobjdump)
        resources.append(
            KernelResources(kernel.__name__, registers, spill_bytes, loop_spills, compiled.metadata.shared)
        )
    return resources


def _cuobjdump(triton: object) -> str:
    """The ``cuobjdump`` the Triton wheel carries (else one on PATH)."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"  # type: ignore[attr-defined]
    found = str(bundled) if bundled.is_file() else shutil.which("cuobjdump")
    if found is None:
        raise OfflineCompileError("no cuobjdump: neither in the Triton wheel nor on PATH")
    return found


def _register_use(cubin: bytes, cuobjdump: str) -> tuple[int, int, int]:
    """(registers per thread, stack bytes per thread, spill instructions in loops) of the kernel in ``cubin``."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True)
        sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report.stdout)
    if match is None:
        raise OfflineCompileError(f"cuobjdump -res-usage printed no register use: {report.stdout[:200]!r}")
    return int(match[1]), int(match[2]), _loop_spill_instructions(sass)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _loop_spill_instructions(sass: str) -> int:
    """``LDL``/``STL`` instructions between a backward branch and its target (a loop body)."""
    instructions = [(int(m[1], 16), m[2]) for m in map(_SASS_LINE.search, sass.splitlines()) if m]
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if branch and int(branch[1], 16) < address:
            loops.append((int(branch[1], 16), address))
    spills = [address for address, text in instructions if re.search(r"\b(LDL|STL)\b", text)]
    return sum(any(start <= address <= end for start, end in loops) for address in spills)
