"""Device-to-host reads of the training loop: none in a step that is not a log step.

Every way a tensor's value reaches Python (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``index``) is
counted over a short single-process ``Trainer.fit()``, each read labelled with the optimizer step it belongs to:
inside ``train_step`` of step n, or after it (the log step's read of the metrics and of the non-finite record,
the last step's checkpoint). Reads made while the loader produces the next batch are left out: they are the
loader's own host data (``torch.utils.data.DataLoader`` draws each epoch's base seed from a CPU generator with
``item``), never a tensor the step computed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from sface_dist.config import Config
from sface_dist.training.step_metrics import DeviceMetrics
from sface_dist.training.trainer import AgreedBatches, Trainer

from synthetic_trainer import ENV, make_config

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
STEPS, LOG_EVERY, BATCH = 5, 2, 4
LOG_STEPS = {2, 4, 5}
"""Steps that log (every second, and the last, which also checkpoints)."""


def count_reads(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, int]]:
    """Run ``trainer.fit()``; the reads by (``"in"`` or ``"after"`` ``train_step``, step)."""
    reads: Counter[tuple[str, int]] = Counter()
    where: dict[str, tuple[str, int] | None] = {"now": None}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(tensor: Tensor, *args: object, _original=original, **kwargs: object) -> object:  # noqa: ANN001
            if where["now"] is not None:
                reads[where["now"]] += 1
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    train_step, agreed_batches = trainer.train_step, AgreedBatches.__iter__

    def step(batches: list[tuple[Tensor, Tensor]]) -> DeviceMetrics:
        where["now"] = ("in", trainer.step + 1)
        metrics = train_step(batches)
        where["now"] = ("after", trainer.step + 1)
        return metrics

    def loading(self: AgreedBatches) -> Iterator[tuple[Tensor, Tensor]]:
        batches = agreed_batches(self)
        while True:
            kept, where["now"] = where["now"], None
            batch = next(batches, None)
            where["now"] = kept
            if batch is None:
                return
            yield batch

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(AgreedBatches, "__iter__", loading)
    trainer.fit()
    where["now"] = None
    return reads


def run_config(output: Path, **train: object) -> Config:
    return make_config(output, batch_size=BATCH, steps=STEPS, log_every=LOG_EVERY, **train)


def fit_reads(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, int]]:
    trainer = Trainer(cfg, ENV)
    try:
        reads = count_reads(trainer, monkeypatch)
        assert trainer.step == STEPS
        return reads
    finally:
        trainer.close()


@pytest.mark.parametrize(
    ("sample_rate", "num_classes", "images_per_class"),
    [(1.0, 6, 8), (0.5, 8, 2)],  # 0.5 of 8 classes: a budget of 4 rows holds every positive of a batch of 4
    ids=["full-head", "partial-fc"],
)
def test_only_log_steps_read_from_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample_rate: float, num_classes: int, images_per_class: int
) -> None:
    cfg = run_config(tmp_path, on_nonfinite="stop")
    cfg.data = dataclasses.replace(cfg.data, num_classes=num_classes, synthetic_images_per_class=images_per_class)
    cfg.head = dataclasses.replace(cfg.head, sample_rate=sample_rate)
    reads = fit_reads(cfg, monkeypatch)
    assert {key: count for key, count in reads.items() if key[0] == "in"} == {}, "reads inside train_step"
    assert {step for _, step in reads} == LOG_STEPS


def test_skip_reads_once_a_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``on_nonfinite: skip`` reads the ranks' agreed flags in every step (one ``tolist``), and nothing else."""
    reads = fit_reads(run_config(tmp_path, on_nonfinite="skip"), monkeypatch)
    assert {key: count for key, count in reads.items() if key[0] == "in"} == {("in", n): 1 for n in range(1, STEPS + 1)}
    assert {step for where, step in reads if where == "after"} == LOG_STEPS
