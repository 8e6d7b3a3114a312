"""The training loop's pieces against formulas written out here: the learning-rate schedule, the step
metrics and what is logged of them, and the gradient path (fp16 loss scaling, clipping of the backbone alone).

One process, world size 1, which needs no process group (as ``python -m sface_dist.train`` without a
launcher); synthetic faces and the tiny backbone keep each test to seconds. The torchrun runs are in
test_end_to_end.py and tests/faults/.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from sface_dist.config import Config, OptimConfig
from sface_dist.training.optimization import Schedule
from sface_dist.training.step_metrics import StepMetrics
from sface_dist.training.trainer import Trainer

from sface_reference import relative_error, sface_reference
from synthetic_trainer import ENV, make_config, record_steps

CLIP = 100.0
"""The clipping tests' bound on the backbone gradient norm: a twelfth of the untrained tiny net's on these faces."""
LR = 0.05
LOG_LINE = re.compile(
    r"^step (\d+)/\d+ loss (\S+) \(intra (\S+) inter (\S+)\) acc (\S+) cos\+ (\S+) cos- (\S+) lr (\S+) ", re.MULTILINE
)


@pytest.fixture
def open_trainer() -> Iterator[Callable[[Config], Trainer]]:
    """Builds trainers on this process and closes them after the test."""
    trainers: list[Trainer] = []

    def build(cfg: Config) -> Trainer:
        trainers.append(Trainer(cfg, ENV))
        return trainers[-1]

    yield build
    for trainer in trainers:
        trainer.close()


def first_batch(trainer: Trainer) -> tuple[Tensor, Tensor]:
    trainer.loader.set_epoch(0)
    return next(iter(trainer.loader))


def one_step(trainer: Trainer, images: Tensor, labels: Tensor) -> StepMetrics:
    return trainer.train_step([(images, labels)]).read()


def backbone_vector(trainer: Trainer) -> Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.backbone.parameters()]).clone()


def reference_step(trainer: Trainer, images: Tensor, labels: Tensor, lr: float) -> tuple[Tensor, Tensor, float]:
    """(backbone update, head update, backbone gradient norm) of the first SGD step from the trainer's state, in fp64.

    The loss is the fp64 SFace formula; the backbone gradient is scaled to norm ``optim.grad_clip`` when above it
    (with ``clip_grad_norm_``'s 1e-6), the head's is not; weight decay is added after clipping, and a first
    step's momentum buffer is the gradient itself.
    """
    optim, head = trainer.cfg.optim, trainer.cfg.head
    backbone = copy.deepcopy(trainer.backbone).double()
    weight = trainer.head.weight.detach().double().requires_grad_(True)
    loss = sface_reference(backbone(images.double()), weight, labels, s=head.s, k=head.k, a=head.a, b=head.b)["loss"]
    loss.backward()
    params = list(backbone.parameters())
    norm = torch.cat([p.grad.flatten() for p in params]).norm().item()
    factor = min(1.0, optim.grad_clip / (norm + 1e-6)) if optim.grad_clip > 0 else 1.0
    backbone_update = torch.cat([(-lr * (factor * p.grad + optim.weight_decay * p.detach())).flatten() for p in params])
    head_update = -lr * (weight.grad + optim.weight_decay * weight.detach())
    return backbone_update, head_update, norm


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.05),  # warmup: 0.2 * (step + 1) / 4
        (1.5, 0.125),
        (3, 0.2),
        (4, 0.2),  # decay: 0.2 * (1 - (step - 4) / 10) ** 2
        (9, 0.05),
        (11.5, 0.0125),
        (14, 0.0),  # the end, and past it
        (20, 0.0),
    ],
)
def test_learning_rate_warms_up_linearly_then_decays_polynomially(step: float, expected: float) -> None:
    schedule = Schedule(OptimConfig(warmup_steps=4, poly_power=2.0), total_steps=14, steps_per_epoch=1)
    assert 0.2 * schedule.factor(step) == pytest.approx(expected, abs=1e-15)


def test_learning_rate_without_warmup_starts_at_the_peak() -> None:
    schedule = Schedule(OptimConfig(warmup_steps=0, poly_power=1.0), total_steps=10, steps_per_epoch=1)
    assert [0.2 * schedule.factor(step) for step in (0, 5, 10)] == pytest.approx([0.2, 0.1, 0.0])


def test_fit_scales_the_peak_with_the_global_batch_and_follows_the_schedule(
    tmp_path: Path, open_trainer: Callable[[Config], Trainer], monkeypatch: pytest.MonkeyPatch
) -> None:
    optim = OptimConfig(lr=0.4, warmup_steps=2, scale_lr_with_batch=True)
    trainer = open_trainer(make_config(tmp_path, batch_size=8, optim=optim, steps=5))
    steps = record_steps(trainer, monkeypatch)
    trainer.fit()
    peak = 0.4 * 8 / 512
    expected = [peak / 2, peak, peak, peak * (2 / 3) ** 2, peak * (1 / 3) ** 2]
    assert [lr for lr, _ in steps] == pytest.approx(expected, rel=1e-12)
    groups = trainer.optimization.backbone_optimizer.param_groups + trainer.optimization.head_optimizer.param_groups
    assert [group["lr"] for group in groups] == pytest.approx([0.0] * len(groups)), "the step after the last"


def test_a_resumed_run_counts_its_schedule_in_its_first_global_batch(
    tmp_path: Path, open_trainer: Callable[[Config], Trainer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two steps of 16 images, then the same run (train.steps=4, of 16) resumed with batches of 8:
    four steps of 8, at schedule steps 2, 2.5, 3 and 3.5."""
    optim = OptimConfig(lr=0.1, warmup_steps=1)
    first = open_trainer(make_config(tmp_path, batch_size=16, optim=optim, steps=2))
    first.fit()
    first.close()
    resumed = open_trainer(make_config(tmp_path, batch_size=8, optim=optim, steps=4))
    steps = record_steps(resumed, monkeypatch)
    resumed.fit()
    decay = [(1 - (step - 1) / 3) ** 2 for step in (2, 2.5, 3, 3.5)]
    assert [lr for lr, _ in steps] == pytest.approx([0.1 * d for d in decay], rel=1e-12)
    assert resumed.step == 6


def test_step_metrics_are_the_fp64_loss_and_statistics_of_the_batch(
    tmp_path: Path, open_trainer: Callable[[Config], Trainer]
) -> None:
    trainer = open_trainer(make_config(tmp_path))
    images, labels = first_batch(trainer)
    with torch.no_grad():
        embeddings = copy.deepcopy(trainer.backbone)(images)
    head = trainer.cfg.head
    weight = trainer.head.weight.detach()
    expected = sface_reference(embeddings, weight, labels, s=head.s, k=head.k, a=head.a, b=head.b)
    metrics = one_step(trainer, images, labels)
    assert set(metrics.scalars()) == {"loss", "intra", "inter", "cos_target", "cos_nontarget", "accuracy"}
    for name, value in metrics.scalars().items():
        assert value == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-6), name


def test_the_log_line_and_tensorboard_report_the_logged_step_not_a_window_mean(
    tmp_path: Path,
    open_trainer: Callable[[Config], Trainer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trainer = open_trainer(make_config(tmp_path, steps=4, log_every=2))
    steps = record_steps(trainer, monkeypatch)
    trainer.fit()
    trainer.close()
    assert steps[0][1].loss != pytest.approx(steps[1][1].loss, abs=1e-3), "a mean over the window would not show"
    lines = LOG_LINE.findall(capsys.readouterr().out)
    assert [int(line[0]) for line in lines] == [2, 4]
    for step, *logged in lines:
        lr, m = steps[int(step) - 1]
        terms = (m.loss, m.diagnostics["intra"], m.diagnostics["inter"], m.accuracy, m.cos_target, m.cos_nontarget)
        expected = [f"{m.loss:.4f}", *(f"{value:.3f}" for value in terms[1:]), f"{lr:.4g}"]
        assert logged == expected, step
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for name in ("loss", "intra", "inter", "cos_target", "cos_nontarget", "accuracy"):
        scalars = [(event.step, event.value) for event in events.Scalars(f"train/{name}")]
        expected = [(step, pytest.approx(steps[step - 1][1].scalars()[name], rel=1e-6, abs=1e-7)) for step in (2, 4)]
        assert scalars == expected, name
    lrs = [(event.step, event.value) for event in events.Scalars("train/lr")]
    assert lrs == [(step, pytest.approx(steps[step - 1][0], rel=1e-6)) for step in (2, 4)]


@pytest.mark.parametrize("grad_clip", [CLIP, 0.0], ids=["clip", "no-clip"])
def test_one_step_clips_the_backbone_gradient_alone(
    tmp_path: Path, open_trainer: Callable[[Config], Trainer], grad_clip: float
) -> None:
    """The parameters after one step against the fp64 step: the backbone gradient clipped to ``grad_clip``
    (0: not clipped), the head's never."""
    trainer = open_trainer(make_config(tmp_path, optim=OptimConfig(lr=LR, grad_clip=grad_clip)))
    images, labels = first_batch(trainer)
    backbone_update, head_update, norm = reference_step(trainer, images, labels, trainer.optimization.lr)
    assert norm > 2 * CLIP, f"the backbone gradient norm {norm:.3g} must be above the clip for this test to clip"
    backbone_before, head_before = backbone_vector(trainer), trainer.head.weight.detach().clone()
    one_step(trainer, images, labels)
    assert relative_error(backbone_vector(trainer) - backbone_before, backbone_update) < 1e-4
    assert relative_error(trainer.head.weight.detach() - head_before, head_update) < 1e-4


def test_fp16_unscales_the_backbone_gradient_before_clipping_it(
    tmp_path: Path, open_trainer: Callable[[Config], Trainer]
) -> None:
    """Clipping the scaled gradient would leave an update ``scale`` times too small. At the initial
    scale (2^16) the fp16 gradients overflow and the scaler skips the backbone's step and halves the
    scale; the first step it keeps is compared (fp16 activations: within 3%)."""
    trainer = open_trainer(make_config(tmp_path, optim=OptimConfig(lr=LR, grad_clip=CLIP), amp="fp16", steps=64))
    images, labels = first_batch(trainer)
    for _ in range(16):
        backbone_update, _, norm = reference_step(trainer, images, labels, trainer.optimization.lr)
        backbone_before, scale = backbone_vector(trainer), trainer.optimization.grad_scaler.get_scale()
        one_step(trainer, images, labels)
        if trainer.optimization.grad_scaler.get_scale() == scale:
            break
    assert scale >= 2**8, f"the step was kept at loss scale {scale}, too small to tell unscaled from scaled"
    assert norm > 2 * CLIP, f"the backbone gradient norm {norm:.3g} must be above the clip for this test to clip"
    assert relative_error(backbone_vector(trainer) - backbone_before, backbone_update) < 3e-2
