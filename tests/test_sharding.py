"""The sharding invariant (DESIGN.md §4) on real gloo ranks.

For world sizes 1-4, an uneven class split and ragged per-rank batches, the loss,
the backbone gradients (after DDP) and the concatenated head gradient must equal
one fp64 process training on the concatenated batch, to 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rank_launcher import run_ranks
from sface_reference import relative_error, sface_reference
from sface_dist.distributed import DistEnv, class_range, data_parallel
from sface_dist.heads import ShardedSFaceHead

NUM_CLASSES = 11
IN_FEATURES, EMBEDDING = 6, 8
ROWS_PER_RANK = {1: [12], 2: [5, 7], 3: [3, 5, 4], 4: [2, 4, 1, 5]}
IMPLS = ("dense", "chunked")
STAT_NAMES = ("loss", "intra", "inter", "cos_target", "cos_nontarget", "accuracy")
PARAM_SETS = {"official": dict(s=64.0, k=80.0, a=0.80, b=1.23), "soft": dict(s=30.0, k=4.0, a=1.2, b=1.4)}


def make_backbone() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.Tanh(), nn.Linear(16, EMBEDDING))


def make_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global inputs, labels and full head weight; one row is a copy of its class centre (cos = 1)."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(12, IN_FEATURES, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (12,), generator=gen)
    weight = torch.randn(NUM_CLASSES, EMBEDDING, generator=gen)
    with torch.no_grad():
        weight[labels[0]] = make_backbone()(inputs[:1])[0]
    return inputs, labels, weight


def shard_worker(rank: int, world: int) -> dict[tuple[str, str], dict[str, object]]:
    """Every (implementation, parameter set) on this rank's rows: one spawn per world size."""
    inputs, labels, weight = make_problem()
    sizes = ROWS_PER_RANK[world]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    results = {}
    for impl in IMPLS:
        for param_set, params in PARAM_SETS.items():
            backbone = data_parallel(make_backbone(), env)
            head = ShardedSFaceHead(NUM_CLASSES, EMBEDDING, impl=impl, chunk_size=2, **params)
            with torch.no_grad():
                head.weight.copy_(weight[head.class_start : head.class_end])
            out = head(backbone(inputs[rows]), labels[rows])
            out.loss.backward()
            results[impl, param_set] = {
                "range": head.class_range,
                "head_grad": head.weight.grad.clone(),
                "backbone_grads": [p.grad.clone() for p in backbone.parameters()],
                "stats": {name: getattr(out, name).detach().clone() for name in STAT_NAMES},
            }
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_head_matches_single_process_fp64(world: int) -> None:
    per_rank = run_ranks(shard_worker, world)
    for impl in IMPLS:
        for param_set in PARAM_SETS:
            check_against_reference([r[impl, param_set] for r in per_rank], world, PARAM_SETS[param_set])


def check_against_reference(results: list[dict[str, object]], world: int, params: dict[str, float]) -> None:
    inputs, labels, weight = make_problem()
    backbone = make_backbone().double()
    weight = weight.double().requires_grad_(True)
    reference = sface_reference(backbone(inputs.double()), weight, labels, **params)
    reference["loss"].backward()

    assert [r["range"] for r in results] == [class_range(NUM_CLASSES, r, world) for r in range(world)]
    for r in results:
        for name in STAT_NAMES:
            assert relative_error(r["stats"][name], reference[name]) < 1e-5, name
    head_grad = torch.cat([r["head_grad"] for r in results])
    assert relative_error(head_grad, weight.grad) < 1e-5
    for r in results:
        for got, param in zip(r["backbone_grads"], backbone.parameters(), strict=True):
            assert relative_error(got, param.grad) < 1e-5
