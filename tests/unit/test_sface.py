"""SFace block math against the formula of docs/design.md (The SFace loss), single process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sface_dist.heads import SFaceParams, ShardedSFaceHead
from sface_dist.heads.sface import auto_chunk_size

from sface_reference import relative_error, sface_reference

OFFICIAL = dict(s=64.0, k=80.0, a=0.80, b=1.23)
IMPLS = ["dense", "chunked"]


def run_head(impl: str, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **params: float):
    head = ShardedSFaceHead(weight.shape[0], weight.shape[1], SFaceParams(**params), impl=impl, chunk_size=3)
    with torch.no_grad():
        head.weight.copy_(weight)
    x = embeddings.clone().requires_grad_(True)
    out = head(x, labels)
    out.loss.backward()
    return out, x.grad, head.weight.grad


def reference(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **params: float):
    x = embeddings.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    ref = sface_reference(x, w, labels, **params)
    ref["loss"].backward()
    return ref, x.grad, w.grad


@pytest.mark.parametrize("impl", IMPLS)
def test_targets_at_theta_zero_give_finite_exact_loss(impl: str) -> None:
    """Rows equal to their class centre: cos rounds above 1 in fp32; an unclamped acos would give NaN."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(7, 64, generator=gen) * 3.0
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2])
    embeddings = weight[labels] * torch.rand(8, 1, generator=gen).add(0.5)
    out, grad_x, grad_w = run_head(impl, embeddings, weight, labels, **OFFICIAL)
    ref, ref_grad_x, ref_grad_w = reference(embeddings, weight, labels, **OFFICIAL)
    assert torch.isfinite(out.loss)
    assert relative_error(out.loss, ref["loss"]) < 1e-5
    assert relative_error(grad_x, ref_grad_x) < 1e-5
    assert relative_error(grad_w, ref_grad_w) < 1e-5
    assert out.accuracy.item() == 1.0


def test_unclamped_acos_of_fp32_self_dots_is_nan() -> None:
    """The reason for the clamp: some fp32 self-dots of normalised vectors exceed 1."""
    x_hat = F.normalize(torch.randn(1000, 512, generator=torch.Generator().manual_seed(0)), dim=1)
    self_dots = (x_hat * x_hat).sum(dim=1)
    assert torch.isnan(torch.acos(self_dots)).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_easy_batch(impl: str) -> None:
    """Targets near θ=0 and non-targets near orthogonal: every sigmoid weight saturates towards 0."""
    embeddings = torch.eye(6, 16)[torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])] * 2.0
    weight = torch.eye(6, 16) + 0.01 * torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    out, grad_x, grad_w = run_head(impl, embeddings, weight, labels, **OFFICIAL)
    ref, ref_grad_x, ref_grad_w = reference(embeddings, weight, labels, **OFFICIAL)
    assert relative_error(out.loss, ref["loss"]) < 1e-5
    assert ref_grad_w.abs().max() < 1e-10
    assert grad_w.abs().max() < 1e-10
    assert grad_x.abs().max() < 1e-10
    assert out.accuracy.item() == 1.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("params", [OFFICIAL, dict(s=30.0, k=5.0, a=1.3, b=1.4)])
def test_random_batch_matches_formula(impl: str, params: dict[str, float]) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(10, 32, generator=gen)
    labels = torch.randint(0, 10, (9,), generator=gen)
    embeddings = weight[labels] + 0.8 * torch.randn(9, 32, generator=gen)
    out, grad_x, grad_w = run_head(impl, embeddings, weight, labels, **params)
    ref, ref_grad_x, ref_grad_w = reference(embeddings, weight, labels, **params)
    values = {**vars(out), **out.diagnostics}
    for name in ("loss", "intra", "inter", "cos_target", "cos_nontarget", "accuracy"):
        assert relative_error(values[name], ref[name]) < 1e-5, name
    assert relative_error(grad_x, ref_grad_x) < 1e-5
    assert relative_error(grad_w, ref_grad_w) < 1e-5


def test_fp64_inputs_are_computed_in_fp64() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2])
    embeddings = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    params = dict(s=30.0, k=5.0, a=1.3, b=1.4)
    head = ShardedSFaceHead(5, 8, SFaceParams(**params), impl="chunked", chunk_size=2).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    out = head(embeddings, labels)
    ref, _, _ = reference(embeddings, weight, labels, **params)
    assert relative_error(out.loss, ref["loss"]) < 1e-12


def test_auto_chunk_size_counts_both_kinds_of_temporaries_against_the_budget() -> None:
    """4 [B, rows] and 4 [rows, D] fp32 tensors a chunk, rows = classes x sub-centres: at B=1,024, D=512 a 64 MiB
    budget holds 2,730 classes (4,096 if only the [B, rows] ones counted); at B=8 the [rows, D] ones decide."""
    assert auto_chunk_size(1024, 100_000, 512, budget_bytes=64 * 2**20) == 2730
    assert auto_chunk_size(1024, 100_000, 512, sub_centers=3, budget_bytes=64 * 2**20) == 910
    assert auto_chunk_size(8, 100_000, 512, budget_bytes=2**20) == 2**20 // (16 * 520) == 126
    assert auto_chunk_size(8, 10, 128) == 10


def test_bad_embedding_size_and_labels_are_named() -> None:
    head = ShardedSFaceHead(5, 8, check_inputs=True)
    with pytest.raises(ValueError, match="embedding size 8"):
        head(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        head(torch.randn(2, 8), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"non-finite embeddings at rows \[0\]"):
        head(torch.tensor([[float("nan")] * 8, [1.0] * 8]), torch.tensor([0, 1]))
