"""The sharding invariant (docs/design.md, Sharding) on real gloo ranks.

For world sizes 1-4, an uneven class split and ragged per-rank batches, the loss,
the diagnostics, the backbone gradients (after DDP) and the concatenated head
gradient must equal one fp64 process on the concatenated batch, to 1e-5 relative:
for SFace (dense, chunked and the Triton kernels, full and Partial-FC sampled) and every
margin head. The ranks run the Triton kernels under ``TRITON_INTERPRET=1`` (set in the ranks only).
With ``train.grad_comm=bf16`` (one head) the backbone gradients hold to bf16's precision instead.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sface_dist.config import GradComm, HeadConfig
from sface_dist.heads import build_head
from sface_dist.heads.kernels.fused import interpreter_enabled
from sface_dist.parallel.data_parallel import data_parallel
from sface_dist.parallel.launch import DistEnv
from sface_dist.parallel.partition import class_range

from rank_launcher import run_ranks
from sface_reference import margin_reference, relative_error, sface_reference

NUM_CLASSES = 23
IN_FEATURES, EMBEDDING = 6, 8
ROWS_PER_RANK = {1: [12], 2: [5, 7], 3: [3, 5, 4], 4: [2, 4, 1, 5]}
OFFICIAL = dict(s=64.0, k=80.0, a=0.80, b=1.23)
SOFT = dict(s=30.0, k=4.0, a=1.2, b=1.4)
HEADS: dict[str, HeadConfig] = {
    "sface-dense": HeadConfig(impl="dense", **OFFICIAL),
    "sface-chunked": HeadConfig(impl="chunked", chunk_size=2, **OFFICIAL),
    "sface-dense-soft": HeadConfig(impl="dense", **SOFT),
    "sface-chunked-soft": HeadConfig(impl="chunked", chunk_size=2, **SOFT),
    "sface-chunked-sampled": HeadConfig(
        impl="chunked", chunk_size=2, sample_rate=0.5, sample_correction="none", **SOFT
    ),
    "sface-chunked-sampled-inverse": HeadConfig(
        impl="chunked", chunk_size=2, sample_rate=0.5, sample_correction="inverse_rate", **SOFT
    ),
    "sface-dense-sampled-centres": HeadConfig(
        impl="dense", sample_rate=0.5, sample_correction="inverse_rate_centres", **SOFT
    ),
    "sface-dense-sampled-embeddings": HeadConfig(
        impl="dense", sample_rate=0.5, sample_correction="inverse_rate_embeddings", **SOFT
    ),
    "sface-positives-only": HeadConfig(impl="dense", sample_rate=0.0, **SOFT),
    "sface-triton": HeadConfig(impl="triton", **OFFICIAL),
    "sface-triton-soft": HeadConfig(impl="triton", **SOFT),
    "sface-triton-sampled": HeadConfig(impl="triton", sample_rate=0.5, sample_correction="inverse_rate", **SOFT),
    "arcface": HeadConfig(type="arcface", s=16.0),
    "cosface": HeadConfig(type="cosface", s=16.0),
    "combined": HeadConfig(type="combined", s=16.0),
    "softmax": HeadConfig(type="softmax", s=16.0),
    "arcface-sampled": HeadConfig(type="arcface", s=16.0, sample_rate=0.5, sample_correction="none"),
    "arcface-sampled-centres": HeadConfig(
        type="arcface", s=16.0, sample_rate=0.5, sample_correction="inverse_rate_centres"
    ),
    "arcface-sampled-inverse": HeadConfig(type="arcface", s=16.0, sample_rate=0.5, sample_correction="inverse_rate"),
    "arcface-exact": HeadConfig(type="arcface", s=16.0, margin_grad="exact"),
    "sface-dense-subcentres": HeadConfig(impl="dense", sub_centers=3, **SOFT),
    "sface-chunked-subcentres": HeadConfig(impl="chunked", chunk_size=2, sub_centers=3, **OFFICIAL),
    "sface-chunked-subcentres-soft": HeadConfig(impl="chunked", chunk_size=2, sub_centers=3, **SOFT),
    "sface-chunked-subcentres-sampled": HeadConfig(
        impl="chunked", chunk_size=2, sub_centers=2, sample_rate=0.5, sample_correction="inverse_rate_centres", **SOFT
    ),
    "arcface-subcentres": HeadConfig(type="arcface", s=16.0, sub_centers=3),
    "arcface-subcentres-sampled": HeadConfig(type="arcface", s=16.0, sub_centers=3, sample_rate=0.5,
                                             sample_correction="none"),
    "combined-exact": HeadConfig(type="combined", s=16.0, margin_grad="exact"),
}
STAT_NAMES = {"sface": ("loss", "intra", "inter", "cos_target", "cos_nontarget", "accuracy")}
MARGIN_STAT_NAMES = ("loss", "cos_target", "cos_nontarget", "accuracy")
BF16_GRAD_COMM_HEAD = "sface-dense"
BF16_TOLERANCE = 1e-2  # a few bf16 roundings (2^-9 relative each): the bucket's, then the sum's


def make_backbone() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.Tanh(), nn.Linear(16, EMBEDDING))


def make_problem(sub_centers: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global inputs, labels and full head weight [C·K, D] (class-major); one row is a copy of its class's first
    centre (cos = 1)."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(12, IN_FEATURES, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (12,), generator=gen)
    assert len(set(labels.tolist())) < NUM_CLASSES - 8, "the problem needs negatives to sample"
    weight = torch.randn(NUM_CLASSES, EMBEDDING, generator=gen)
    if sub_centers > 1:
        others = torch.randn(NUM_CLASSES, sub_centers - 1, EMBEDDING, generator=gen)
        weight = torch.cat([weight.unsqueeze(1), others], dim=1).flatten(0, 1)
    with torch.no_grad():
        weight[labels[0] * sub_centers] = make_backbone()(inputs[:1])[0]
    return inputs, labels, weight


def centre_rows(classes: torch.Tensor, sub_centers: int) -> torch.Tensor:
    """The weight rows of ``classes``, each class's K centres in order."""
    return (classes.unsqueeze(1) * sub_centers + torch.arange(sub_centers)).flatten()


STAT_TOLERANCE = 5e-5
"""The loss and its terms are fp32 sums over the batch of terms through SFace's steep sigmoid re-scaling, whose
rounding follows the CPU's matmul kernels: up to 1.8e-5 relative to fp64 on an AMD EPYC (sub-centres with
sampling), under 1e-5 on an Intel Xeon. A wrong shard, sample or reduction moves them by orders of magnitude more;
the gradients below are held to 1e-5."""


def stat_names(cfg: HeadConfig) -> tuple[str, ...]:
    return STAT_NAMES.get(cfg.type, MARGIN_STAT_NAMES)


def shard_worker(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Every head configuration on this rank's rows: one spawn per world size."""
    sizes = ROWS_PER_RANK[world]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    results = {}
    for name, cfg in HEADS.items():
        if cfg.impl == "triton":
            assert interpreter_enabled(), "the Triton heads must run their kernels, not the chunked fallback"
        inputs, labels, weight = make_problem(cfg.sub_centers)
        results[name] = train_step(cfg, env, inputs[rows], labels[rows], weight, "fp32")
    inputs, labels, weight = make_problem()
    results["bf16-grad-comm"] = train_step(HEADS[BF16_GRAD_COMM_HEAD], env, inputs[rows], labels[rows], weight, "bf16")
    return results


def train_step(cfg: HeadConfig, env: DistEnv, inputs: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
               grad_comm: GradComm) -> dict[str, Any]:
    """One forward and backward of a DDP backbone and a sharded head on this rank's rows."""
    backbone = data_parallel(make_backbone(), env, grad_comm=grad_comm)
    head = build_head(cfg, NUM_CLASSES, EMBEDDING, process_group=None, seed=5)
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start * cfg.sub_centers : head.class_end * cfg.sub_centers])
    out = head(backbone(inputs), labels, step=1)
    out.loss.backward()
    sample = out.sampled_rows
    stats = {**vars(out), **out.diagnostics}
    return {
        "range": head.class_range,
        "head_grad": head.weight.grad.clone(),
        "backbone_grads": [p.grad.clone() for p in backbone.parameters()],
        "stats": {stat: stats[stat].detach().clone() for stat in stat_names(cfg)},
        "sampled_classes": None if sample is None else sample + head.class_start,
        "correction": head.sample_correction,
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_heads_match_single_process_fp64(world: int) -> None:
    per_rank = run_ranks(shard_worker, world, env={"TRITON_INTERPRET": "1"})
    for name, cfg in HEADS.items():
        check_against_reference(name, cfg, [r[name] for r in per_rank], world)
    bf16 = [r["bf16-grad-comm"] for r in per_rank]
    errors = check_against_reference("bf16-grad-comm", HEADS[BF16_GRAD_COMM_HEAD], bf16, world, BF16_TOLERANCE)
    if world > 1:  # the sum really went through bf16: fp32 communication lands within 1e-6
        assert max(errors) > 1e-5, f"bf16 grad_comm: backbone gradients as exact as fp32 ({max(errors):.1e})"


def reference(cfg: HeadConfig, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              negative_weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if cfg.type == "sface":
        return sface_reference(embeddings, weight, labels, cfg.s, cfg.k, cfg.a, cfg.b, negative_weight,
                               cfg.sub_centers)
    from sface_dist.heads.margin import MARGIN_TYPES

    m1, m2, m3 = cfg.margin or MARGIN_TYPES[cfg.type]
    return margin_reference(embeddings, weight, labels, cfg.s, m1, m2, m3, cfg.margin_grad, negative_weight,
                            cfg.sub_centers)


def sampled_weights(correction: str, weights: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(weight of each sampled class's negative term in the loss, factor on its centre's gradient),
    from ``sface_dist/heads/sampling.py``'s definition of each correction; ``weights`` is 1 or 1/q per class."""
    ones = torch.ones_like(weights)
    return {
        "none": (None, ones),
        "inverse_rate": (weights, ones),
        "inverse_rate_centres": (None, weights),
        "inverse_rate_embeddings": (weights, weights.reciprocal()),
    }[correction]


def expected_inter_scale(result: dict[str, Any], positives: set[int]) -> torch.Tensor:
    """1 for a shard's positives, (available negatives / sampled negatives) for its sampled negatives."""
    start, end = result["range"]
    sampled = result["sampled_classes"].tolist()
    shard_positives = {c for c in positives if start <= c < end}
    kept_negatives = len(sampled) - len(shard_positives)
    negative_scale = (end - start - len(shard_positives)) / kept_negatives if kept_negatives else 1.0
    return torch.tensor([1.0 if c in shard_positives else negative_scale for c in sampled], dtype=torch.float64)


def check_against_reference(name: str, cfg: HeadConfig, results: list[dict[str, Any]], world: int,
                            backbone_tolerance: float = 1e-5) -> list[float]:
    """Assert each rank's results against one fp64 process; return the backbone gradients' relative errors."""
    k = cfg.sub_centers
    inputs, labels, weight = make_problem(k)
    backbone = make_backbone().double()
    weight = weight.double().requires_grad_(True)
    classes = torch.arange(NUM_CLASSES)
    negative_weight, centre_factor = None, torch.ones(NUM_CLASSES, dtype=torch.float64)
    if results[0]["sampled_classes"] is not None:
        classes = torch.cat([r["sampled_classes"] for r in results])
        weights = torch.cat([expected_inter_scale(r, set(labels.tolist())) for r in results])
        negative_weight, centre_factor = sampled_weights(results[0]["correction"], weights)
        assert set(labels.tolist()) <= set(classes.tolist()), f"{name}: a positive class was not sampled"
    position = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
    position[classes] = torch.arange(classes.numel())
    rows = centre_rows(classes, k)
    expected = reference(cfg, backbone(inputs.double()), weight[rows], position[labels], negative_weight)
    expected["loss"].backward()
    weight.grad[rows] *= centre_factor.repeat_interleave(k).unsqueeze(1)

    assert [r["range"] for r in results] == [class_range(NUM_CLASSES, r, world) for r in range(world)]
    for r in results:
        for stat in stat_names(cfg):
            assert relative_error(r["stats"][stat], expected[stat]) < STAT_TOLERANCE, f"{name}: {stat}"
    head_grad = torch.cat([r["head_grad"] for r in results])
    assert relative_error(head_grad, weight.grad) < 1e-5, f"{name}: head gradient"
    errors = []
    for r in results:
        for got, param in zip(r["backbone_grads"], backbone.parameters(), strict=True):
            errors.append(relative_error(got, param.grad))
            assert errors[-1] < backbone_tolerance, f"{name}: backbone gradient"
    return errors
