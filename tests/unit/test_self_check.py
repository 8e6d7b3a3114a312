"""Start-up checks of the GPU paths: the fused SFace block (``sface_dist/heads/self_check.py``) and DALI's GPU decoder
(``sface_dist/data/decoder_check.py``).

On CPU the real kernel check runs under the Triton interpreter in one worker process (this file run as a
script: ``TRITON_INTERPRET`` must be set before Triton compiles, as in tests/unit/test_kernels.py). Failures are
forced by monkeypatching the fused block and DALI's loader, and the GPU by monkeypatching where each check
decides whether it runs (``self_check_device``, ``gpu_decoding``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from sface_dist.config import HeadConfig
from sface_dist.data import decoder_check, loader
from sface_dist.data.dali import DaliFaceLoader, dali_available
from sface_dist.data.decoder_check import MEAN_ABS_TOLERANCE, compare_batches
from sface_dist.data.errors import DataError
from sface_dist.data.torch_backend import TorchFaceLoader
from sface_dist.heads import build, build_head, impl_choice, self_check
from sface_dist.heads.self_check import TOLERANCES, SelfCheckError, check_triton_block
from sface_dist.heads.sface import BlockOptions, BlockResult, SFaceParams, sface_block_chunked
from sface_dist.parallel import agreement
from sface_dist.parallel.agreement import PeerError

from loader_datasets import config, epoch, make_rec
from triton_interpreter import interpreted_results

DIM = 16
FAILED_FP32 = "the Triton SFace block failed its fp32 self-check: "
FALLBACK = "; training with head.impl=chunked\n"
SCALED_GRADIENT = "grad_x differs from the fp64 chunked block by 0.01 (relative, tolerance 0.0001)"
INTERPRETED_PRECISIONS = ("fp32", "bf16")


def run_interpreted() -> dict[str, dict[str, object]]:
    """The real check of each precision at a small shard, under the interpreter (the worker's job)."""
    results = {}
    for precision in INTERPRETED_PRECISIONS:
        result = check_triton_block(precision, 32, torch.device("cpu"), rows=37, classes=45)
        results[precision] = {"cause": result.cause, "errors": result.errors}
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, object]]:
    return interpreted_results(__file__, timeout_s=300)


@pytest.mark.parametrize("precision", INTERPRETED_PRECISIONS)
def test_real_kernels_pass_their_check_under_the_interpreter(
    interpreted: dict[str, dict[str, object]], precision: str
) -> None:
    """The compiled-on-CPU kernels agree, each quantity measured (not skipped) and inside the kernel tests' bounds."""
    result = interpreted[precision]
    assert result["cause"] is None, result
    errors = result["errors"]
    assert isinstance(errors, dict)
    loss_tolerance, grad_tolerance = TOLERANCES[precision]
    assert set(errors) == {"loss", "intra", "inter", "cos_target", "max_nontarget", "grad_x", "grad_w"}
    assert 0 < errors["loss"] < loss_tolerance and 0 < errors["grad_w"] < grad_tolerance, errors


def raising_block(*args: object, **kwargs: object) -> BlockResult:
    raise RuntimeError("PassManager::run failed\n(the compiler's log follows)")


def block_with_gradient_scaled(factor: float):  # noqa: ANN201
    """The chunked block, but ∂L/∂x̂ comes out ``factor`` times too large (the values stay right)."""

    def block(
        x_hat: Tensor, weight: Tensor, local_labels: Tensor, inter_scale: Tensor | None,
        params: SFaceParams, options: BlockOptions, skip_threshold: float = 0.0,
    ) -> BlockResult:
        scaled = x_hat + (factor - 1.0) * (x_hat - x_hat.detach())
        return sface_block_chunked(scaled, weight, local_labels, inter_scale, params, options)

    return block


@pytest.fixture
def on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's check runs on the CPU as it would on a GPU."""
    monkeypatch.setattr(impl_choice, "self_check_device", lambda impl: torch.device("cpu"))


def sface_head(impl: str):  # noqa: ANN201
    return build_head(HeadConfig(impl=impl, precision="fp32"), 10, DIM, process_group=None)  # type: ignore[arg-type]


@pytest.mark.usefixtures("on_gpu")
def test_auto_falls_back_when_the_kernel_raises(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(self_check, "sface_block_triton", raising_block)
    assert sface_head("auto").impl == "chunked"
    cause = "RuntimeError: PassManager::run failed"
    assert capsys.readouterr().out == f"warning: head.impl=auto: {FAILED_FP32}{cause}{FALLBACK}"


@pytest.mark.usefixtures("on_gpu")
def test_auto_falls_back_when_a_gradient_disagrees(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(self_check, "sface_block_triton", block_with_gradient_scaled(1.01))
    assert sface_head("auto").impl == "chunked"
    assert capsys.readouterr().out == f"warning: head.impl=auto: {FAILED_FP32}{SCALED_GRADIENT}{FALLBACK}"


@pytest.mark.usefixtures("on_gpu")
def test_auto_keeps_triton_when_the_block_agrees(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(self_check, "sface_block_triton", block_with_gradient_scaled(1.0))
    assert sface_head("auto").impl == "triton"
    out = capsys.readouterr().out
    passed = r"head\.impl=auto: SFace block runs 'triton' \(its fp32 self-check passed in \d+\.\d s\)\n"
    assert re.fullmatch(passed, out), out


@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize(
    ("block", "cause"),
    [
        (raising_block, "RuntimeError: PassManager::run failed"),
        (block_with_gradient_scaled(1.01), SCALED_GRADIENT),
    ],
)
def test_explicit_triton_raises_with_the_cause(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], block: object, cause: str
) -> None:
    monkeypatch.setattr(self_check, "sface_block_triton", block)
    with pytest.raises(SelfCheckError) as raised:
        sface_head("triton")
    assert str(raised.value) == f"head.impl=triton: {FAILED_FP32}{cause} (head.impl=auto would train with chunked)"
    assert capsys.readouterr().out == ""


def test_no_check_without_a_gpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Where the fused block would not run on a GPU, ``auto`` takes ``chunked`` unchecked, and ``triton`` is refused
    in one line unless the interpreter runs the kernels."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the check")
    monkeypatch.setattr(self_check, "sface_block_triton", raising_block)
    assert sface_head("auto").impl == "chunked"
    assert "warning" not in capsys.readouterr().out
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^head.impl=triton: the fused kernels need a CUDA device \(or "
                       r"TRITON_INTERPRET=1"):
        sface_head("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sface_head("triton").impl == "triton"
    assert capsys.readouterr().out == (
        "head.impl=triton: SFace block runs 'triton' (TRITON_INTERPRET=1: interpreted on the CPU)\n")


@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_agree_and_rank_0_names_the_failing_rank(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], rank: int
) -> None:
    """Two ranks, rank 1's block raises, rank 0's agrees (the gather of their causes stands in for gloo)."""
    monkeypatch.setattr(self_check, "sface_block_triton", raising_block if rank == 1 else block_with_gradient_scaled(1))
    monkeypatch.setattr(agreement, "group_size", lambda group: 2)
    monkeypatch.setattr(agreement, "group_rank", lambda group: rank)

    def all_gather_object(gathered: list[str | None], message: str | None, group: object = None) -> None:
        gathered[:] = [message, "RuntimeError: PassManager::run failed"] if rank == 0 else [None, message]

    monkeypatch.setattr(agreement.dist, "all_gather_object", all_gather_object)
    summary = "the Triton SFace block failed its fp32 self-check on rank 1: RuntimeError: PassManager::run failed"
    choice = impl_choice.choose_impl("auto", "fp32", DIM, SFaceParams(), None)
    assert choice.impl == "chunked" and choice.line() + "\n" == f"warning: head.impl=auto: {summary}{FALLBACK}"
    monkeypatch.setattr(build, "group_rank", lambda group: rank)
    assert sface_head("auto").impl == "chunked"
    assert capsys.readouterr().out == (f"warning: head.impl=auto: {summary}{FALLBACK}" if rank == 0 else "")
    expected = (PeerError, f"rank 1: {summary}") if rank == 0 else (
        SelfCheckError, f"head.impl=triton: {summary} (head.impl=auto would train with chunked)"
    )
    with pytest.raises(expected[0]) as raised:
        impl_choice.choose_impl("triton", "fp32", DIM, SFaceParams(), None)
    assert str(raised.value) == expected[1]


def reference_batch() -> tuple[Tensor, Tensor]:
    """Four images of whole grey levels, normalised, and their labels."""
    levels = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    return (levels.float() - 127.5) / 127.5, torch.tensor([3, 1, 4, 1])


def test_compare_batches_names_what_differs() -> None:
    images, labels = reference_batch()
    level = 1 / 127.5
    assert compare_batches((images, labels), (images, labels)) is None
    within = (images + 2 * level).clamp(-1, 1)
    assert compare_batches((within, labels), (images, labels)) is None
    off = images.clone()
    off[images < 0] += 8 * level
    difference = (off - images).abs().mean().item()
    assert difference > MEAN_ABS_TOLERANCE
    assert compare_batches((off, labels), (images, labels)) == (
        f"mean absolute difference {difference:.2g} from the CPU decode, tolerance 0.024 (3 grey levels)"
    )
    assert compare_batches((images[:, :, :4], labels), (images, labels)) == (
        "batch of shape (4, 3, 4, 8), the CPU decode has (4, 3, 8, 8)"
    )
    assert compare_batches((images, labels.flip(0)), (images, labels)) == "labels differ from the CPU decode's"
    out_of_range = "pixels in [-128, 128], expected within [-1, 1]"
    assert compare_batches((images * 127.5, labels), (images, labels)) == out_of_range
    assert compare_batches((images / 0, labels), (images, labels)) == "non-finite pixels"


needs_dali = pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI")
GARBAGE = "DALI's GPU decoder failed its first-batch check: "


@pytest.fixture
def dataset_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small PNG dataset, and DALI decoding as if on a GPU (its CPU decoder stands in for ``mixed``)."""
    monkeypatch.setattr(loader, "gpu_decoding", lambda device: True)
    return make_rec(tmp_path, [i % 5 for i in range(12)])


def grey_decoder(self: DaliFaceLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """A decoder that returns mid-grey images (with the right labels) whatever it is given."""
    for images, labels in TorchFaceLoader(self._dataset, self._sampler, 0, torch.device("cpu")):
        yield torch.zeros_like(images), labels


@pytest.fixture
def garbage_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DaliFaceLoader, "__iter__", grey_decoder)


def first_torch_batch(root: Path) -> Tensor:
    return epoch(loader.build_loader(config(root, backend="torch"), 0, 1, seed=0), 0)[0][0]


@needs_dali
def test_auto_keeps_dali_when_its_decode_agrees(dataset_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built = loader.build_loader(config(dataset_root, backend="auto"), 0, 1, seed=0)
    assert isinstance(built, DaliFaceLoader)
    assert capsys.readouterr().out == ""


@needs_dali
@pytest.mark.usefixtures("garbage_decoder")
def test_auto_falls_back_to_torch_when_dali_decodes_garbage(
    dataset_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = loader.build_loader(config(dataset_root, backend="auto"), 0, 1, seed=0)
    assert isinstance(built, TorchFaceLoader)
    difference = first_torch_batch(dataset_root).abs().mean().item()
    cause = f"mean absolute difference {difference:.2g} from the CPU decode, tolerance 0.024 (3 grey levels)"
    assert capsys.readouterr().out == f"warning: data.backend=auto: {GARBAGE}{cause}; loading with data.backend=torch\n"


@needs_dali
@pytest.mark.usefixtures("garbage_decoder")
def test_explicit_dali_raises_when_it_decodes_garbage(dataset_root: Path) -> None:
    difference = first_torch_batch(dataset_root).abs().mean().item()
    cause = f"mean absolute difference {difference:.2g} from the CPU decode, tolerance 0.024 (3 grey levels)"
    with pytest.raises(DataError) as raised:
        loader.build_loader(config(dataset_root, backend="dali"), 0, 1, seed=0)
    assert str(raised.value) == f"data.backend=dali: {GARBAGE}{cause} (data.backend=auto would load with torch)"


@needs_dali
def test_auto_falls_back_when_dali_fails(
    dataset_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(self: DaliFaceLoader) -> Iterator[tuple[Tensor, Tensor]]:
        raise RuntimeError("nvJPEG: CUDA driver version is insufficient\n(traceback)")

    monkeypatch.setattr(decoder_check.DaliFaceLoader, "__iter__", failing)
    assert isinstance(loader.build_loader(config(dataset_root, backend="auto"), 0, 1, seed=0), TorchFaceLoader)
    cause = "RuntimeError: nvJPEG: CUDA driver version is insufficient"
    assert capsys.readouterr().out == f"warning: data.backend=auto: {GARBAGE}{cause}; loading with data.backend=torch\n"


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker runs under the Triton interpreter"
    print(json.dumps(run_interpreted()))
