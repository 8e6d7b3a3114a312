"""``train.engine: deepspeed`` on 2 real gloo ranks, against the DDP path as the reference.

One optimizer step of ZeRO-1 and ZeRO-2 lands on DDP's weights (summed gradients, clipping, momentum), also under
bf16 autocast and with ``train.grad_accum`` 2; the same step with DeepSpeed's averaging left in lands far from
them. Checkpoints written by either engine hold the same backbone and torch-layout optimizer state, and resume
under the other engine and on one rank as the straight run goes on.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from sface_dist.checkpoint import load_trainer_state, resolve_checkpoint
from sface_dist.file_digest import file_record

from deepspeed_setup import CLASSES, ENGINES, PER_RANK, cpu_env, make_config
from rank_launcher import run_ranks


def _batches(rank: int, world: int, grad_accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(grad_accum * world * PER_RANK, 3, 112, 112, generator=gen)
    labels = torch.randint(0, CLASSES, (len(images),), generator=gen)
    starts = [(micro * world + rank) * PER_RANK for micro in range(grad_accum)]
    return [(images[s : s + PER_RANK], labels[s : s + PER_RANK]) for s in starts]


def step_worker(rank: int, world: int, output: str) -> dict[str, list[torch.Tensor]]:
    """One optimizer step per case from the same initial weights: each engine with the clip binding, the same under
    bf16 autocast, and 2 micro-steps without clipping (where a gradient off by a factor shows in the step), with
    DeepSpeed's averaging left in too."""
    from sface_dist.training import engine as engine_module
    from sface_dist.training.trainer import Trainer

    cases = {name: (name, 1, 1.0, "none") for name in ENGINES}
    cases |= {"ddp bf16": ("ddp", 1, 1.0, "bf16"), "zero2 bf16": ("zero2", 1, 1.0, "bf16")}
    cases |= {name: (engine, 2, 0.0, "none") for name, engine in
              [("ddp accum", "ddp"), ("zero2 accum", "zero2"), ("zero2 accum averaged", "zero2")]}
    results = {}
    for case, (engine, grad_accum, clip, amp) in cases.items():
        averaged = mock.patch.object(engine_module._SumAcrossRanks, "apply", lambda x, _: x)
        with averaged if case.endswith("averaged") else contextlib.nullcontext():
            trainer = Trainer(
                make_config(Path(output) / case.replace(" ", "-"), engine, grad_accum, grad_clip=clip, amp=amp),
                cpu_env(rank, world),
            )
            try:
                results.setdefault("initial", [p.detach().clone() for p in trainer.backbone.parameters()])
                trainer.train_step(_batches(rank, world, grad_accum))
                results[case] = [p.detach().clone() for p in trainer.backbone.parameters()]
            finally:
                trainer.close()
    return results


def _relative(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    diff = torch.cat([(g - e).flatten() for g, e in zip(got, expected, strict=True)]).norm()
    return float(diff / torch.cat([e.flatten() for e in expected]).norm())


def _update(result: dict[str, list[torch.Tensor]], case: str) -> list[torch.Tensor]:
    """The step a case took from the common initial weights."""
    return [after - before for after, before in zip(result[case], result["initial"], strict=True)]


def test_zero_steps_like_ddp_with_summed_gradients(tmp_path: Path) -> None:
    for result in run_ranks(step_worker, 2, str(tmp_path)):
        assert _relative(result["zero1"], result["ddp"]) < 1e-5
        assert _relative(result["zero2"], result["ddp"]) < 1e-5
        bf16_update = _update(result, "zero2 bf16")
        assert _relative(bf16_update, _update(result, "ddp bf16")) < 1e-5
        assert _relative(bf16_update, _update(result, "ddp")) > 1e-3, "bf16 autocast changed nothing"
        accumulated = _relative(result["zero2 accum"], result["ddp accum"])
        assert accumulated < 1e-5
        assert _relative(result["zero2 accum averaged"], result["ddp accum"]) > 1000 * max(accumulated, 1e-9)


def skip_worker(rank: int, world: int, output: str) -> dict[str, Any]:
    """Three steps under ``on_nonfinite: skip`` with a NaN planted in the head's gradient at step 2 only."""
    from sface_dist.training.trainer import Trainer

    results = {}
    for engine in ("ddp", "zero1", "zero2"):
        cfg = make_config(Path(output) / engine, engine, steps=3)
        cfg.train.on_nonfinite = "skip"
        trainer = Trainer(cfg, cpu_env(rank, world))
        try:
            trainer.head.weight.register_hook(lambda grad: grad * float("nan") if trainer.step == 1 else grad)
            trainer.fit()
            results[engine] = ([p.detach().clone() for p in trainer.backbone.parameters()], trainer.watch.skipped)
        finally:
            trainer.close()
    return results


def test_a_skipped_step_leaves_no_gradient_behind(tmp_path: Path) -> None:
    """A skipped step leaves no gradient behind under ZeRO-1 and ZeRO-2: the step after it matches DDP's."""
    for result in run_ranks(skip_worker, 2, str(tmp_path)):
        ddp, skipped = result["ddp"]
        assert skipped == 1
        for engine in ("zero1", "zero2"):
            zero, zero_skipped = result[engine]
            assert zero_skipped == 1
            assert _relative(zero, ddp) < 1e-5, engine


def tiny_with_a_frozen_parameter(name: str, embedding_size: int) -> torch.nn.Module:
    """The tiny backbone with its first parameter frozen, as IResNet freezes its last batch norm's scale: the
    torch optimizer lists it, DeepSpeed's partitions leave it out."""
    from sface_dist.backbones import build_backbone

    model = build_backbone(name, embedding_size)
    next(model.parameters()).requires_grad = False
    return model


def fit_worker(rank: int, world: int, runs: list[tuple[str, str, int, str]]) -> None:
    """Train each (output, engine, steps, optimizer) in turn, resuming from the output's latest checkpoint."""
    import sface_dist.training.trainer as trainer_module

    for output, engine, steps, optimizer in runs:
        cfg = make_config(Path(output), engine, steps=steps, optimizer=optimizer)
        with mock.patch.object(trainer_module, "build_backbone", tiny_with_a_frozen_parameter):
            trainer = trainer_module.Trainer(cfg, cpu_env(rank, world))
        try:
            trainer.fit()
        finally:
            trainer.close()


def _state(output: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = load_trainer_state(resolve_checkpoint(output / "checkpoints" / "latest"))
    return state["backbone"], state["backbone_optimizer"]


def _assert_same_state(got: Path, expected: Path, tolerance: float) -> None:
    (weights, optimizer), (ref_weights, ref_optimizer) = _state(got), _state(expected)
    assert list(weights) == list(ref_weights)
    for name, tensor in ref_weights.items():
        assert torch.allclose(weights[name].double(), tensor.double(), rtol=tolerance, atol=tolerance), name
    assert optimizer["state"].keys() == ref_optimizer["state"].keys()
    assert 0 not in optimizer["state"] and len(optimizer["state"]) > 1  # the frozen parameter has no state
    for index, entry in ref_optimizer["state"].items():
        assert optimizer["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.allclose(optimizer["state"][index][key], value, rtol=tolerance, atol=tolerance), key
    assert [g["params"] for g in optimizer["param_groups"]] == [g["params"] for g in ref_optimizer["param_groups"]]


def test_checkpoints_resume_across_engines_and_world_sizes(tmp_path: Path) -> None:
    """Two steps under DDP and under ZeRO-2 write the same checkpoint (SGD's momentum; AdamW's moments and step
    under ZeRO-1); DDP resumed under ZeRO-1 (SGD and AdamW) and ZeRO-2 resumed under DDP reach
    the DDP run's step 4; on one rank, both resume alike for two steps. Two, not four: the SFace head (k=80) and
    the tiny net's 4-image batch norms amplify rounding, so that four one-rank steps of DDP alone, resumed with the
    clip threshold moved by 1e-6, end with momentum 1.9e-5 apart, as far as ZeRO-1 from DDP there; after two,
    both stay within 6e-8 on every CPU capability (avx512, avx2, default)."""
    ddp, zero = tmp_path / "ddp", tmp_path / "zero2"
    adamw = [(str(tmp_path / f"{engine}-adamw"), engine, 2, "adamw") for engine in ("ddp", "zero1")]
    run_ranks(fit_worker, 2, [(str(ddp), "ddp", 2, "sgd"), (str(zero), "zero2", 2, "sgd"), *adamw])
    _assert_same_state(zero, ddp, 1e-5)
    _assert_same_state(tmp_path / "zero1-adamw", tmp_path / "ddp-adamw", 1e-5)
    for source, target in ((ddp, "ddp-then-zero1"), (zero, "zero2-then-ddp"), (zero, "one-rank-zero1"),
                           (zero, "one-rank-ddp"), (tmp_path / "ddp-adamw", "ddp-adamw-then-zero1")):
        shutil.copytree(source, tmp_path / target)
    straight = tmp_path / "straight"
    run_ranks(fit_worker, 2, [(str(straight), "ddp", 4, "sgd"), (str(tmp_path / "ddp-then-zero1"), "zero1", 4, "sgd"),
                              (str(tmp_path / "zero2-then-ddp"), "ddp", 4, "sgd"),
                              (str(tmp_path / "ddp-adamw"), "ddp", 4, "adamw"),
                              (str(tmp_path / "ddp-adamw-then-zero1"), "zero1", 4, "adamw")])
    _assert_same_state(tmp_path / "ddp-then-zero1", straight, 1e-5)
    _assert_same_state(tmp_path / "zero2-then-ddp", straight, 1e-5)
    _assert_same_state(tmp_path / "ddp-adamw-then-zero1", tmp_path / "ddp-adamw", 1e-5)
    run_ranks(fit_worker, 1, [(str(tmp_path / "one-rank-zero1"), "zero1", 3, "sgd"),
                              (str(tmp_path / "one-rank-ddp"), "ddp", 3, "sgd")])
    _assert_same_state(tmp_path / "one-rank-zero1", tmp_path / "one-rank-ddp", 1e-5)


def resume_worker(rank: int, world: int, output: str) -> str:
    """Resume ``output`` under ZeRO-1 and return the one line the resume stops with."""
    from sface_dist.checkpoint import CheckpointError
    from sface_dist.training.trainer import Trainer

    try:
        Trainer(make_config(Path(output), "zero1", steps=4), cpu_env(rank, world)).close()
    except CheckpointError as error:
        return str(error)
    return "resumed"


def test_zero_refuses_an_optimizer_state_of_the_wrong_shape_at_load(tmp_path: Path) -> None:
    """A momentum buffer of another shape loaded into ZeRO's partitions and failed at the first step (134 lines)."""
    run = tmp_path / "run"
    run_ranks(fit_worker, 2, [(str(run), "zero1", 2, "sgd")])
    checkpoint = resolve_checkpoint(run / "checkpoints" / "latest")
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    index = next(iter(state["backbone_optimizer"]["state"]))
    state["backbone_optimizer"]["state"][index]["momentum_buffer"] = torch.zeros(10)
    torch.save(state, checkpoint / "trainer.pt")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["trainer.pt"] = file_record(checkpoint / "trainer.pt")
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    for line in run_ranks(resume_worker, 2, str(run)):
        assert re.fullmatch(rf"{re.escape(str(checkpoint))}: the backbone optimizer state does not fit: "
                            rf"momentum_buffer of parameter {index} has shape \[10\], the parameter \[.*\]", line), line
