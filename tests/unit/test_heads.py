"""Head features beyond the invariant: Partial-FC statistics, the shard optimizer, precisions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sface_dist import train
from sface_dist.config import HeadConfig, HeadType, MarginHeadType, SampleCorrection, choices
from sface_dist.heads import HeadOutput, SFaceParams, ShardedSFaceHead, ShardOptimizer, build_head
from sface_dist.heads.margin import MARGIN_TYPES
from sface_dist.heads.probe import embeddings_at_cosine
from sface_dist.heads.sampling import sample_classes, scored_rows, step_generator
from sface_dist.heads.sharded import initial_weight_rows
from sface_dist.parallel.partition import class_range

from sface_reference import relative_error, sface_reference

SOFT = dict(s=30.0, k=4.0, a=1.2, b=1.4)


def test_sampling_keeps_positives_and_is_reproducible() -> None:
    labels = torch.tensor([3, 3, 7, -1, 12])
    first = sample_classes(labels, 20, 0.4, step_generator(0, 0, 5, torch.device("cpu")), "none")
    again = sample_classes(labels, 20, 0.4, step_generator(0, 0, 5, torch.device("cpu")), "none")
    other = sample_classes(labels, 20, 0.4, step_generator(0, 0, 6, torch.device("cpu")), "none")
    assert torch.equal(first.rows, again.rows) and not torch.equal(first.rows, other.rows)
    assert first.rows.numel() == 8 and {3, 7, 12} <= set(first.rows.tolist())
    assert torch.equal(first.rows, first.rows.sort().values)
    assert first.rows[first.labels[:3]].tolist() == [3, 3, 7] and first.labels[3] == -1


@pytest.mark.parametrize(
    ("correction", "loss_weight", "centre_factor"),
    [
        ("none", None, None),
        ("inverse_rate", 17 / 5, None),
        ("inverse_rate_centres", None, 17 / 5),
        ("inverse_rate_embeddings", 17 / 5, 5 / 17),
    ],
)
def test_sample_corrections_weigh_negatives(correction: str, loss_weight: float | None, centre_factor: float | None):
    """17 negatives available, 5 kept (q = 5/17): positives weigh 1, negatives as the correction says."""
    labels = torch.tensor([3, 3, 7, -1, 12])
    sample = sample_classes(labels, 20, 0.4, step_generator(0, 0, 5, torch.device("cpu")), correction)
    positive = torch.isin(sample.rows, torch.tensor([3, 7, 12]))
    for got, negative in ((sample.inter_scale, loss_weight), (sample.centre_grad_scale, centre_factor)):
        if negative is None:
            assert got is None
        else:
            assert got[positive].eq(1.0).all()
            torch.testing.assert_close(got[~positive], torch.full((5,), negative))


def test_positives_only() -> None:
    sample = sample_classes(torch.tensor([4, 1, 4]), 10, 0.0, step_generator(0, 0, 1, torch.device("cpu")), "none")
    assert sample.rows.tolist() == [1, 4]


def previous_sample_classes(
    local_labels: torch.Tensor, num_local: int, sample_rate: float, generator: torch.Generator, correction: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The draw as it was before the number of scored rows became static: (rows, labels, negative weights)."""
    owned = local_labels[local_labels >= 0]
    positive = torch.zeros(num_local, dtype=torch.bool)
    positive[owned] = True
    num_positive = int(positive.sum())
    num_negative = num_local - num_positive
    keep_negative = min(num_negative, max(0, int(sample_rate * num_local) - num_positive))
    score = torch.rand(num_local, generator=generator)
    score[positive] = 2.0
    rows = torch.topk(score, num_positive + keep_negative, sorted=False).indices.sort().values
    position = torch.full((num_local,), -1, dtype=torch.long)
    position[rows] = torch.arange(rows.numel())
    labels = torch.where(local_labels >= 0, position[local_labels.clamp_min(0)], -1)
    if correction == "none":
        return rows, labels, None
    inverse_rate = num_negative / keep_negative if keep_negative else 1.0
    return rows, labels, torch.where(positive[rows], 1.0, inverse_rate).to(torch.float32)


def random_draw_case(gen: torch.Generator) -> tuple[torch.Tensor, int, float]:
    num_local = int(torch.randint(1, 60, (1,), generator=gen))
    batch = int(torch.randint(1, 40, (1,), generator=gen))
    labels = torch.randint(-1, num_local, (batch,), generator=gen)
    rate = [0.0, 0.05, 0.1, 0.3, 0.5, 0.99, 1.0][int(torch.randint(0, 7, (1,), generator=gen))]
    return labels, num_local, rate


def test_draw_is_the_previous_one_on_random_cases() -> None:
    """Rows, mapped labels and weights equal the previous implementation's, bit for bit, whether the
    budget holds the positives (static count) or not (rate 0, positives beyond the budget)."""
    gen = torch.Generator().manual_seed(0)
    static = overflowing = 0
    for case in range(400):
        labels, num_local, rate = random_draw_case(gen)
        correction = choices(SampleCorrection)[case % 4]
        positives = labels[labels >= 0].unique().numel()
        static += scored_rows(num_local, rate, labels.numel()) is not None
        overflowing += positives > int(rate * num_local)
        got = sample_classes(labels, num_local, rate, step_generator(1, 0, case, torch.device("cpu")), correction)
        rows, mapped, weight = previous_sample_classes(
            labels, num_local, rate, step_generator(1, 0, case, torch.device("cpu")), correction
        )
        assert torch.equal(got.rows, rows) and torch.equal(got.labels, mapped), case
        got_weight = got.centre_grad_scale if correction == "inverse_rate_centres" else got.inter_scale
        assert (got_weight is None) == (weight is None), case
        if weight is not None:
            assert got_weight.dtype == weight.dtype and torch.equal(got_weight, weight), case
    assert static > 100 and overflowing > 50, (static, overflowing)


def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args, _name: str = name, _original=original):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_draw_reads_nothing_back_when_the_budget_holds_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of at least the gathered batch: no host read; rate 0 (positives only) reads the count, once."""
    labels = torch.tensor([3, 3, 7, -1, 12, 40])
    reads = count_host_reads(monkeypatch)
    sample = sample_classes(labels, 100, 0.1, step_generator(0, 0, 1, torch.device("cpu")), "inverse_rate")
    assert reads == [] and sample.rows.numel() == scored_rows(100, 0.1, labels.numel()) == 10
    sample_classes(labels, 100, 0.0, step_generator(0, 0, 1, torch.device("cpu")), "inverse_rate")
    assert len(reads) == 1 and scored_rows(100, 0.0, labels.numel()) is None
    monkeypatch.undo()
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda size, generator, device: rand(size, device="meta"))
    on_meta = sample_classes(labels.to("meta"), 100, 0.1, None, "inverse_rate_embeddings")
    assert on_meta.rows.shape == (10,) and on_meta.inter_scale.shape == (10,), "meta tensors hold no data to read"


def test_draw_is_a_function_of_the_step_not_of_the_calls() -> None:
    """An extra forward changes no later draw; micro-step 0 is the step's own draw, other micro-steps differ."""
    head = ShardedSFaceHead(60, 8, impl="dense", sample_rate=0.2, seed=4, params=SFaceParams(**SOFT))
    x, labels = torch.randn(4, 8), torch.tensor([0, 5, 5, 9])
    first = head(x, labels, step=7).sampled_rows
    head(x, labels, step=3)
    assert torch.equal(head(x, labels, step=7).sampled_rows, first)
    assert torch.equal(head(x, labels, step=7, micro_step=0).sampled_rows, first)
    assert not torch.equal(head(x, labels, step=7, micro_step=1).sampled_rows, first)
    assert not torch.equal(head(x, labels, step=8).sampled_rows, first)
    with pytest.raises(ValueError, match="head.sample_rate < 1: the Partial-FC draw needs its step"):
        head(x, labels)
    assert ShardedSFaceHead(60, 8, impl="dense")(x, labels).sampled_rows is None


def test_margin_heads_report_no_sface_terms() -> None:
    x, labels = torch.randn(4, 8), torch.tensor([0, 5, 5, 9])
    assert set(ShardedSFaceHead(10, 8, impl="dense")(x, labels).diagnostics) == {"intra", "inter"}
    assert build_head(HeadConfig(type="arcface"), 10, 8, None)(x, labels).diagnostics == {}


@pytest.mark.parametrize("head_type", ["arcface", "cosface", "combined"])
def test_margin_heads_count_the_plain_top1_as_accuracy(head_type: str) -> None:
    """Each embedding at cosine 0.6 from its own centre and 0.5 from another: every prediction is right, while the
    margined target logit (ArcFace: cos(θ + 0.5) = 0.17) is below the other class's, which a margined count
    would report as 0 correct."""
    centres = torch.eye(4, 8, dtype=torch.float64)
    x = 0.6 * centres + 0.5 * centres.roll(1, dims=0) + (1 - 0.36 - 0.25) ** 0.5 * torch.eye(8, dtype=torch.float64)[4:]
    labels = torch.arange(4)
    head = build_head(HeadConfig(type=head_type), 4, 8, None).double()
    with torch.no_grad():
        head.weight.copy_(centres)
    out = head(x, labels)
    assert out.accuracy.item() == 1.0
    assert torch.allclose(out.cos_target, torch.tensor(0.6, dtype=torch.float64))


def adamw_twin(weight: torch.Tensor, **hyper) -> tuple[torch.Tensor, torch.optim.AdamW]:
    twin = weight.detach().clone().requires_grad_(True)
    return twin, torch.optim.AdamW([twin], foreach=False, **hyper)


def step_beside_torch(
    head: ShardedSFaceHead,
    ours: ShardOptimizer,
    twin: torch.Tensor,
    torchs: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> HeadOutput:
    """One step per batch of ``ours`` on the head and of the torch optimizer ``torchs`` on ``twin``, same gradient;
    the last step's head output."""
    for step, (x, y) in enumerate(batches, start=1):
        out = head(x, y, step=step)
        out.loss.backward()
        twin.grad = head.weight.grad.clone()
        ours.step(out.sampled_rows)
        torchs.step()
        ours.zero_grad()
    return out


def test_rows_adamw_is_torch_adamw_on_each_row_with_its_own_state() -> None:
    """fp64: every row moves as ``torch.optim.AdamW`` over the steps that drew it; unsampled rows and their
    moments and step counts stay put."""
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    head = ShardedSFaceHead(12, 4, impl="dense", sample_rate=0.5, params=SFaceParams(**SOFT)).double()
    optimizer = ShardOptimizer(head, name="adamw", **hyper)
    twins = [adamw_twin(row, **hyper) for row in head.weight.detach()]
    gen = torch.Generator().manual_seed(0)
    draws = [torch.tensor([0, 3, 4, 7]), torch.tensor([3, 5]), torch.tensor([0, 1, 3, 11]), torch.tensor([3])]
    for rows in draws:
        head.weight.grad = torch.randn(12, 4, generator=gen, dtype=torch.float64)
        for row in rows.tolist():
            twins[row][0].grad = head.weight.grad[row].clone()
            twins[row][1].step()
        optimizer.step(rows)
    state = optimizer.state_dict()["rows"]
    assert state["step"].tolist() == [2, 1, 0, 4, 1, 1, 0, 1, 0, 0, 0, 1]
    for row, (twin, twin_optimizer) in enumerate(twins):
        torch.testing.assert_close(head.weight[row].detach(), twin.detach(), rtol=1e-13, atol=1e-15)
        moments = twin_optimizer.state.get(twin, {})
        for key in ("exp_avg", "exp_avg_sq"):
            expected = moments.get(key, torch.zeros(4, dtype=torch.float64))
            torch.testing.assert_close(state[key][row], expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("sample_rate", "sample_update"), [(1.0, "rows"), (0.3, "shard")])
def test_shard_adamw_is_torch_adamw(sample_rate: float, sample_update: str) -> None:
    head = ShardedSFaceHead(30, 8, impl="dense", sample_rate=sample_rate, params=SFaceParams(**SOFT)).double()
    hyper = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    ours = ShardOptimizer(head, name="adamw", sample_update=sample_update, **hyper)
    twin, torchs = adamw_twin(head.weight, **hyper)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(5, 8, generator=gen, dtype=torch.float64), torch.randint(0, 30, (5,), generator=gen))
        for _ in range(3)
    ]
    step_beside_torch(head, ours, twin, torchs, batches)
    torch.testing.assert_close(head.weight.detach(), twin.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ours.state_dict()["rows"]["exp_avg_sq"], torchs.state[twin]["exp_avg_sq"])


def test_sampled_sface_is_unbiased() -> None:
    """Mean over many draws of the sampled loss and embedding gradient equals the full ones."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 16, generator=gen)
    labels = torch.randint(0, 5, (6,), generator=gen)
    embeddings = torch.randn(6, 16, generator=gen)
    x_full = embeddings.double().requires_grad_(True)
    reference = sface_reference(x_full, weight, labels, **SOFT)
    reference["loss"].backward()
    head = ShardedSFaceHead(
        40, 16, SFaceParams(**SOFT), impl="dense", sample_rate=0.25, seed=3, sample_correction="inverse_rate"
    ).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    losses, grads = [], []
    for step in range(1, 2001):
        x = embeddings.double().requires_grad_(True)
        out = head(x, labels, step=step)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(x.grad)
    losses_t, grads_t = torch.stack(losses), torch.stack(grads)
    assert losses_t.std() > 1e-3, "the draws must differ for the test to mean anything"
    sem = losses_t.std() / len(losses) ** 0.5
    assert abs(losses_t.mean() - reference["loss"]) < 4 * sem
    grad_sem = grads_t.std(dim=0) / len(grads) ** 0.5
    z = (grads_t.mean(dim=0) - x_full.grad).abs() / grad_sem.clamp_min(1e-12)
    assert z.max() < 5.0


def test_shard_sgd_touches_only_sampled_rows() -> None:
    """Weight, momentum and weight decay change only on the rows drawn at each step."""
    torch.manual_seed(0)
    head = ShardedSFaceHead(30, 8, sample_rate=0.3, seed=1, params=SFaceParams(**SOFT))
    optimizer = ShardOptimizer(head, lr=0.5, momentum=0.9, weight_decay=0.01)
    weight = head.weight.detach().clone()
    momentum = torch.zeros_like(weight)
    labels = torch.tensor([0, 5, 5, 9])
    for step in range(1, 4):
        out = head(torch.randn(4, 8), labels, step=step)
        out.loss.backward()
        rows = out.sampled_rows
        grad = head.weight.grad.clone()
        optimizer.step(rows)
        optimizer.zero_grad()
        untouched = torch.ones(30, dtype=torch.bool)
        untouched[rows] = False
        assert grad[untouched].abs().max() == 0
        update = grad[rows] + 0.01 * weight[rows]
        momentum[rows] = 0.9 * momentum[rows] + update
        weight[rows] -= 0.5 * momentum[rows]
        torch.testing.assert_close(head.weight.detach(), weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(optimizer.state[head.weight]["momentum_buffer"], momentum, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("sample_rate", "sample_update"), [(1.0, "rows"), (0.3, "shard")])
def test_shard_sgd_is_torch_sgd_without_sampling_or_with_shard_update(sample_rate: float, sample_update: str) -> None:
    """``sample_update="shard"``: unsampled rows (zero gradient) still decay and move with their momentum."""
    torch.manual_seed(0)
    head = ShardedSFaceHead(30, 8, sample_rate=sample_rate, params=SFaceParams(**SOFT))
    twin = head.weight.detach().clone().requires_grad_(True)
    ours = ShardOptimizer(head, lr=0.1, momentum=0.9, weight_decay=5e-4, sample_update=sample_update)
    torchs = torch.optim.SGD([twin], lr=0.1, momentum=0.9, weight_decay=5e-4)
    batches = [(torch.randn(5, 8), torch.randint(0, 30, (5,))) for _ in range(3)]
    out = step_beside_torch(head, ours, twin, torchs, batches)
    torch.testing.assert_close(head.weight.detach(), twin.detach())
    if sample_rate < 1.0:
        assert out.sampled_rows is not None and out.sampled_rows.numel() < 30
    with pytest.raises(ValueError, match="head.sample_update"):
        ShardOptimizer(head, lr=0.1, sample_update="some")
    with pytest.raises(ValueError, match="optim.name"):
        ShardOptimizer(head, lr=0.1, name="adam")


@pytest.mark.parametrize(
    ("precision", "loss_tol", "grad_tol"),
    [("fp32", 1e-5, 1e-5), ("tf32", 1e-5, 1e-5), ("fp16", 3e-4, 3e-3), ("bf16", 1.5e-3, 3e-2)],
)
@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_precision_against_fp64_on_trained_cosines(precision: str, loss_tol: float, grad_tol: float, impl: str) -> None:
    """Measured errors are in docs/heads.md; these bounds are about 3x those measurements."""
    embeddings, weight, labels = embeddings_at_cosine(128, 1000, 128, 0.7)
    x64 = embeddings.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    reference = sface_reference(x64, w64, labels, s=64.0, k=80.0, a=0.8, b=1.23)
    reference["loss"].backward()
    head = ShardedSFaceHead(1000, 128, impl=impl, precision=precision)
    with torch.no_grad():
        head.weight.copy_(weight)
    x = embeddings.clone().requires_grad_(True)
    out = head(x, labels)
    out.loss.backward()
    assert relative_error(out.loss, reference["loss"]) < loss_tol
    assert relative_error(x.grad, x64.grad) < grad_tol
    assert relative_error(head.weight.grad, w64.grad) < grad_tol


def test_build_head_and_bad_settings() -> None:
    assert isinstance(build_head(HeadConfig(), 10, 8, None), ShardedSFaceHead)
    arc = build_head(HeadConfig(type="arcface"), 10, 8, None)
    assert (arc.params.m1, arc.params.m2, arc.params.m3) == (1.0, 0.5, 0.0)
    cos = build_head(HeadConfig(type="cosface", margin=[1.0, 0.0, 0.35]), 10, 8, None)
    assert cos.params.m3 == 0.35
    with pytest.raises(ValueError, match="head.sample_rate"):
        ShardedSFaceHead(10, 8, sample_rate=1.5)
    with pytest.raises(ValueError, match="head.precision"):
        ShardedSFaceHead(10, 8, precision="int8")
    with pytest.raises(ValueError, match="head.sample_correction"):
        ShardedSFaceHead(10, 8, sample_rate=0.5, sample_correction="half")
    assert HeadConfig().sample_correction == "auto"
    assert ShardedSFaceHead(10, 8).sample_correction == "inverse_rate_centres"
    assert build_head(HeadConfig(type="arcface"), 10, 8, None).sample_correction == "none"


def test_official_xavier_init_uses_the_global_class_count() -> None:
    """Official SFace: normal with std = gain·sqrt(2 / fan_out), gain 2, fan_out = number of classes."""
    torch.manual_seed(0)
    head = ShardedSFaceHead(2000, 256)
    assert abs(head.weight.std().item() / (2.0 * (2.0 / 2000) ** 0.5) - 1.0) < 0.01
    assert abs(ShardedSFaceHead(2000, 256, init="normal").weight.std().item() / 0.01 - 1.0) < 0.01


def test_initial_weights_do_not_depend_on_the_partition() -> None:
    """Shards of any world size are slices of one matrix; no two shards repeat each other's draws."""
    full = initial_weight_rows(10_000, 8, (0, 10_000), "xavier", seed=3)
    parts = [initial_weight_rows(10_000, 8, class_range(10_000, r, 3), "xavier", seed=3) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(full[:100], full[5000:5100])
    assert not torch.equal(full, initial_weight_rows(10_000, 8, (0, 10_000), "xavier", seed=4))


def test_every_margin_type_has_default_margins() -> None:
    assert sorted(MARGIN_TYPES) == sorted(choices(MarginHeadType))
    assert choices(HeadType) == ("sface", *choices(MarginHeadType))


TRAINING_LINE = re.compile(r"^step (\d+)/\d+ loss (-?[0-9.]+).* acc ([0-9.]+) ", re.MULTILINE)


@pytest.mark.parametrize("head_type", choices(HeadType))
def test_every_head_type_trains(head_type: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Defaults only: on 20 synthetic identities, 100 steps, the loss falls and the training accuracy rises.

    A baseline that does not train (a collapsed margin, a wrong sign) makes any comparison meaningless.
    """
    overrides = [
        "data.backend=synthetic", "data.num_classes=20", "data.synthetic_images_per_class=8", "data.batch_size=32",
        "data.num_workers=0", "model.backbone=tiny", "model.embedding_size=32", f"head.type={head_type}",
        f"train.output={tmp_path / 'run'}", "train.steps=100", "train.log_every=10", "optim.warmup_steps=5",
        "eval.bins=[]",
    ]
    assert train.main(["configs/demo.yaml", *[arg for o in overrides for arg in ("--set", o)]]) == 0
    logged = [(float(m[2]), float(m[3])) for m in TRAINING_LINE.finditer(capsys.readouterr().out)]
    assert len(logged) == 10
    first_loss, first_accuracy = logged[0]
    last_losses, last_accuracies = zip(*logged[-3:], strict=True)
    assert max(last_losses) < first_loss - abs(first_loss) * 0.5, logged
    assert min(last_accuracies) > max(0.6, first_accuracy + 0.4), logged
