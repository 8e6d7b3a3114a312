"""Does Partial FC learn as well as the full head? Train each sampling variant and compare.

    python tools/sampling_study.py --out study/sampling       # every variant, 3 seeds, the demo (~4.5 h on 2 cores)
    python tools/sampling_study.py --out study/sampling-quick --quick  # a smoke test, under a minute
    python tools/sampling_study.py --out study/s --variants sface:1 sface:0.3:none sface:0.3:inverse_rate \\
        --seeds 0 1 2 --diagnose

A variant is ``HEAD:RATE[:CORRECTION[:UPDATE[:CLIP]]]``: the head type, ``head.sample_rate``,
``head.sample_correction``, ``head.sample_update`` and, optionally, ``optim.grad_clip``. Each variant
trains on the demo data (``--data``, built by ``tools/make_demo_data.py`` when missing) through
``sface_dist.train`` with the same config, budget and seed, and is evaluated on the held-out pack.

``OUT/report.md`` holds the table (mean ± std over seeds, and the gap to the full head of the same
type), ``OUT/results.csv`` every run and ``OUT/curves.png`` the training accuracy and target cosine
against the step. ``--diagnose`` adds ``OUT/diagnostics.md``: on the first seed's full-head checkpoint,
the embedding and centre gradients of each correction over many draws, against the full head's
(bias, noise), the backbone gradient norm against ``optim.grad_clip`` and the inter/intra balance
(delete it to measure again).
A run with ``OUT/runs/<variant>-seed<seed>/result.json`` is not trained again: rerun the same command
to continue an interrupted study. ``OUT/study.json`` records the data and each run's ``settings.json``
what trained it (config file and digest, overrides, steps, ranks, code version): a folder made with other
settings is refused, so one ``--out`` holds one study.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from study_runs import (
    claim_study,
    dataset_identity,
    file_identity,
    launch_training,
    mean_std,
    render_synthetic,
    run_each,
    write_json,
)

from sface_dist.checkpoint import read_head_rows
from sface_dist.cli import run_cli
from sface_dist.config import HeadConfig, HeadType, SampleCorrection, SampleUpdate, choices
from sface_dist.data.bin_pack import read_bin
from sface_dist.data.datasets import RecordFaceDataset
from sface_dist.data.torch_backend import normalise
from sface_dist.evaluation.checkpoint_backbone import load_backbone
from sface_dist.evaluation.cli import default_device
from sface_dist.evaluation.embedder import open_model
from sface_dist.evaluation.verification import evaluate_embedder
from sface_dist.heads import ShardedHead, build_head
from sface_dist.heads.sface import SFaceParams, sigmoid_weights

ROOT = Path(__file__).resolve().parents[1]
REPORT_FAR = "1e-03"
CURVES = ("accuracy", "cos_target")


@dataclass(frozen=True)
class Variant:
    """One way of sampling: the head type, its sample rate, the negatives' correction and the optimizer's rows."""

    head: str
    rate: float
    correction: str = "none"
    update: str = "rows"
    grad_clip: float | None = None
    """``optim.grad_clip`` for this variant; None keeps the config's."""

    @property
    def name(self) -> str:
        if self.rate >= 1.0:
            name = f"{self.head}-full"
        else:
            name = f"{self.head}-{self.rate:g}-{self.correction}-{self.update}"
        return name if self.grad_clip is None else f"{name}-clip{self.grad_clip:g}"

    def overrides(self) -> list[str]:
        values = [f"head.type={self.head}", f"head.sample_rate={self.rate}",
                  f"head.sample_correction={self.correction}", f"head.sample_update={self.update}"]
        return values if self.grad_clip is None else [*values, f"optim.grad_clip={self.grad_clip}"]


def parse_variant(text: str) -> Variant:
    """``HEAD:RATE[:CORRECTION[:UPDATE[:CLIP]]]`` as a Variant; errors name the part that is wrong."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 5:
        raise ValueError(f"variant {text!r}: expected HEAD:RATE[:CORRECTION[:UPDATE[:CLIP]]]")
    head = parts[0]
    try:
        rate = float(parts[1])
        grad_clip = float(parts[4]) if len(parts) > 4 else None
    except ValueError:
        raise ValueError(f"variant {text!r}: RATE and CLIP must be numbers") from None
    if head not in choices(HeadType):
        raise ValueError(f"variant {text!r}: head {head!r} is not one of {', '.join(choices(HeadType))}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"variant {text!r}: rate {rate} is not in [0, 1]")
    correction = parts[2] if len(parts) > 2 else "none"
    update = parts[3] if len(parts) > 3 else "rows"
    if correction not in choices(SampleCorrection):
        raise ValueError(
            f"variant {text!r}: correction {correction!r} is not one of {', '.join(choices(SampleCorrection))}"
        )
    if update not in choices(SampleUpdate):
        raise ValueError(f"variant {text!r}: update {update!r} is not one of {', '.join(choices(SampleUpdate))}")
    return Variant(head, rate, correction, update, grad_clip)


DEFAULT_VARIANTS = (
    "sface:1",
    "sface:0.3:none", "sface:0.3:inverse_rate", "sface:0.3:inverse_rate_centres", "sface:0.3:inverse_rate_embeddings",
    "sface:0.3:none:shard", "sface:0.3:inverse_rate:shard", "sface:0.3:inverse_rate:rows:0",
    "sface:0.1:none", "sface:0.1:inverse_rate",
    "arcface:1", "arcface:0.3:none", "arcface:0.3:inverse_rate",
)
QUICK_VARIANTS = ("sface:1", "sface:0.3:none", "sface:0.3:inverse_rate")
QUICK_BATCH = 16
"""Per rank, for --quick: few enough positives per batch that the 200 identities leave negatives to sample."""


@dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.name}-seed{self.seed}"


def prepare_data(args: argparse.Namespace) -> Path:
    """The dataset folder: ``--data`` as given, or synthetic identities rendered there when it holds no dataset.
    A folder with a dataset but no held-out pack is refused: rendering there would overwrite the user's data."""
    root: Path = args.data
    if (root / "train.rec").is_file() and (root / "heldout.bin").is_file():
        return root
    if (root / "train.rec").is_file():
        raise ValueError(f"{root}: holds train.rec but no heldout.bin to evaluate on: add your pack as "
                         f"{root / 'heldout.bin'}, or name an empty --data for synthetic identities")
    identities, images, heldout = (200, 4, 100) if args.quick else (800, 20, 100)
    render_synthetic(root, identities, images, heldout, pairs=600)
    return root


def train(run: Run, root: Path, folder: Path, args: argparse.Namespace) -> None:
    """``sface_dist.train`` on ``root`` with the study's overrides and the variant's."""
    overrides = [f"data.root={root}", f"train.output={folder / 'run'}", f"train.seed={run.seed}",
                 f"train.steps={args.steps}", "train.epochs=0", "eval.bins=[]",
                 f"train.checkpoint_every={args.checkpoint_every or args.steps}",
                 f"train.log_every={max(1, args.steps // 30)}", *run.variant.overrides(), *args.overrides]
    launch_training(args.config, overrides, args.nproc, folder / "train.log", f"run {run.name}")


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The logged ``train/<name>`` scalars of a run, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {name: [(event.step, event.value) for event in events.Scalars(f"train/{name}")] for name in CURVES}


def run_one(run: Run, root: Path, folder: Path, args: argparse.Namespace) -> dict[str, object]:
    """Train and evaluate one run; its result is written last, so a cut run trains again."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train(run, root, folder, args)
    model = open_model(folder / "run", None, default_device())
    verification = evaluate_embedder(model.embed, read_bin(root / "heldout.bin"), batch_size=128)
    curves = read_curves(folder / "run")
    result = {"variant": run.variant.name, **asdict(run.variant), "seed": run.seed,
              "accuracy": verification.accuracy, "tar": verification.to_dict()["tar_at_far"][REPORT_FAR],
              "train_accuracy_mid": curve_value(curves["accuracy"], args.steps // 2),
              "train_accuracy_end": curve_value(curves["accuracy"], args.steps),
              "seconds": time.perf_counter() - start, "curves": curves}
    write_json(folder / "result.json", result)
    return result


def curve_value(curve: list[tuple[int, float]], step: int) -> float:
    """The logged value at the last logged step <= ``step``."""
    before = [value for logged, value in curve if logged <= step]
    return before[-1] if before else float("nan")


def run_settings(run: Run, args: argparse.Namespace) -> dict[str, object]:
    """Everything that determines a run's result besides the study's data."""
    return {**asdict(run.variant), "seed": run.seed, "steps": args.steps, "checkpoint_every": args.checkpoint_every,
            "nproc": args.nproc, "config": file_identity(args.config), "overrides": args.overrides}


def run_study(args: argparse.Namespace, variants: list[Variant]) -> list[dict[str, object]]:
    out: Path = args.out
    root = prepare_data(args)
    claim_study(out, {"tool": "sampling_study", "data": {**dataset_identity(root / "train.rec"),
                                                         "heldout": file_identity(root / "heldout.bin")}})
    runs = [Run(variant, seed) for seed in args.seeds for variant in variants]

    def summary(result: dict[str, object]) -> str:
        return (f"accuracy {result['accuracy']:.4f}, TAR@FAR={REPORT_FAR} {result['tar']:.4f}, training accuracy "
                f"{result['train_accuracy_mid']:.3f} at step {args.steps // 2} in {result['seconds']:.0f} s")

    results = run_each([(run.name, out / "runs" / run.name, run_settings(run, args)) for run in runs],
                       lambda index: run_one(runs[index], root, out / "runs" / runs[index].name, args), summary)
    write_report(out, results, describe_setup(args, out, runs, results))
    if args.diagnose and not (out / "diagnostics.md").is_file():
        full = next((run for run in runs if run.variant.rate >= 1.0 and run.variant.head == "sface"), None)
        if full is None:
            raise ValueError("--diagnose needs an sface:1 variant: its checkpoint is where the gradients are measured")
        write_diagnostics(out, out / "runs" / full.name / "run", root, variants, args)
    return results


def describe_setup(args: argparse.Namespace, out: Path, runs: list[Run], results: list[dict[str, Any]]) -> str:
    """The base config, the overrides of every run and the heads' resolved settings, for the report: read from the
    runs reported (their settings and their run's config)."""
    settings = results[0]["settings"]
    overrides = ", ".join(f"`{item}`" for item in settings["overrides"]) or "none"
    first = yaml.safe_load((out / "runs" / runs[0].name / "run" / "config.yaml").read_text())
    batch = first["data"]["batch_size"] * settings["nproc"]
    data = args.data.resolve()
    shown = data.relative_to(ROOT) if data.is_relative_to(ROOT) else data
    return (f"Config `{Path(settings['config']['path']).name}` on `{shown}`, {settings['nproc']} rank(s), global "
            f"batch {batch}, {settings['steps']} steps, optim.grad_clip {first['optim']['grad_clip']} unless the "
            f"variant says; overrides for every run: {overrides}.")


def write_report(out: Path, results: list[dict[str, object]], setup: str) -> None:
    """``results.csv``, ``report.md`` and ``curves.png``."""
    columns = [key for key in results[0] if key not in ("curves", "settings")]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    groups: dict[str, list[dict[str, object]]] = {}
    for result in results:
        groups.setdefault(str(result["variant"]), []).append(result)
    full = {str(rows[0]["head"]): rows for rows in groups.values() if float(rows[0]["rate"]) >= 1.0}
    seeds = sorted({int(result["seed"]) for result in results})
    code = ", ".join(sorted({str(result["code"]) for result in results}))
    lines = [
        f"{len(results)} runs, seeds {', '.join(map(str, seeds))}, code {code}: mean ± std over seeds (%). Gap: the "
        "variant's mean "
        "minus the full head's of the same type, in points. Training accuracy is the batch's top-1 over the scored "
        "classes, at half and at the end of the run.",
        "",
        setup,
        "",
        f"| variant | held-out accuracy | gap | TAR@FAR={REPORT_FAR} | gap | training accuracy, mid | end | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in groups.items():
        reference = full.get(str(rows[0]["head"]))
        gaps = []
        for key in ("accuracy", "tar"):
            mean = float(np.mean([float(row[key]) for row in rows]))
            gaps.append(f"{100 * (mean - float(np.mean([float(r[key]) for r in reference]))):+.2f}"
                        if reference and reference is not rows else "")
        accuracy, tar = (mean_std([float(row[key]) for row in rows]) for key in ("accuracy", "tar"))
        mid, end = (mean_std([float(row[key]) for row in rows]) for key in ("train_accuracy_mid", "train_accuracy_end"))
        lines.append(f"| {name} | {accuracy} | {gaps[0]} | {tar} | {gaps[1]} | {mid} | {end} | {len(rows)} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_curves(out / "curves.png", groups)


def plot_curves(path: Path, groups: dict[str, list[dict[str, object]]]) -> None:
    """Training accuracy and target cosine against the step, mean over seeds at the steps every seed logged:
    one row of panels per head type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({str(rows[0]["head"]) for rows in groups.values()})
    figure, axes = plt.subplots(len(heads), len(CURVES), figsize=(6 * len(CURVES), 4.5 * len(heads)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, head in enumerate(heads):
        variants = [(name, rows) for name, rows in groups.items() if rows[0]["head"] == head]
        for column, curve in enumerate(CURVES):
            axis = axes[row][column]
            for number, (name, rows) in enumerate(variants):
                logged = [dict(r["curves"][curve]) for r in rows]  # type: ignore[index]
                steps = sorted(set.intersection(*(set(points) for points in logged)))
                values = [np.mean([points[step] for points in logged]) for step in steps]
                full = float(rows[0]["rate"]) >= 1.0
                axis.plot(steps, values, "-" if full else "--", color=colours(number % 10), label=name,
                          linewidth=2.0 if full else 1.2)
            axis.set_xlabel("step")
            axis.set_ylabel(f"{head}: training {curve.replace('_', ' ')} (mean over seeds)")
            axis.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@dataclass
class GradientStats:
    """One correction's gradients over many draws, against the full head's on the same batches."""

    rate: float
    correction: str
    embedding_bias: float
    """||mean over draws - full|| / ||full|| of ∂L/∂embeddings."""
    embedding_noise: float
    """sqrt(mean over draws of ||draw - mean||²) / ||full|| of ∂L/∂embeddings."""
    centre_bias: float
    centre_noise: float
    """The same for ∂L/∂W (the class centres)."""
    backbone_norm: float
    """Mean L2 norm of the backbone gradient over draws (before clipping)."""
    clipped: float
    """Fraction of draws whose backbone gradient norm exceeds ``optim.grad_clip``."""
    inter_intra: float
    """Mean ||inter part|| / ||intra part|| of ∂L/∂embeddings (SFace)."""


def load_batches(root: Path, num_classes: int, image_size: int, batch: int, count: int, seed: int) -> list[tuple]:
    """``count`` random batches of ``batch`` training images (normalised) and labels."""
    dataset = RecordFaceDataset(root, num_classes, image_size)
    order = np.random.default_rng(seed).permutation(len(dataset))[: batch * count]
    batches = []
    for start in range(0, len(order), batch):
        pixels, labels = [], []
        for index in order[start : start + batch].tolist():
            label, encoded = dataset.read_encoded(index)
            pixels.append(dataset.decode(index, encoded))
            labels.append(label)
        batches.append((normalise(torch.from_numpy(np.stack(pixels))), torch.tensor(labels)))
    return batches


def gradient_statistics(
    run_dir: Path, root: Path, rates: list[float], corrections: list[str], draws: int, batches: int, batch: int,
    seed: int = 0,
) -> list[GradientStats]:
    """Measure each correction's gradient estimator at each rate, at the run's checkpoint (one process, the
    whole head). The first entry, ``full``, is the full head itself: no bias, no noise, its norm and balance.

    Each batch is embedded, and its full-head gradients computed, once for every (rate, correction).
    """
    loaded = load_backbone(run_dir)
    weight = read_head_rows(loaded.path)
    num_classes = weight.shape[0]
    backbone = loaded.model.train()
    head_config = HeadConfig(**{**loaded.config["head"], "impl": "dense"})
    params = SFaceParams(head_config.s, head_config.k, head_config.a, head_config.b)
    grad_clip = float(loaded.config["optim"]["grad_clip"])
    data = load_batches(root, num_classes, int(loaded.config["data"]["image_size"]), batch, batches, seed)

    def head_with(sample_rate: float, correction: str) -> ShardedHead:
        head = build_head(replace(head_config, sample_rate=sample_rate, sample_correction=correction),
                          num_classes, weight.shape[1], None, seed)
        with torch.no_grad():
            head.weight.copy_(weight)
        return head

    estimators = [(1.0, "full"), *((rate, correction) for rate in rates for correction in corrections)]
    drawn: dict[tuple[float, str], dict[str, list]] = {
        key: {"embedding": [], "centre": [], "norms": [], "ratios": []} for key in estimators
    }
    full_embedding, full_centre = [], []
    for images, labels in data:
        embeddings = backbone(images)
        full = head_with(1.0, "none")
        reference = torch.autograd.grad(full(embeddings, labels).loss, [embeddings, full.weight], retain_graph=True)
        full_embedding.append(reference[0])
        full_centre.append(reference[1])
        intra = intra_gradient(embeddings, weight, labels, params)
        for rate, correction in estimators:
            head = full if correction == "full" else head_with(rate, correction)
            record = drawn[(rate, correction)]
            per_draw = []
            for draw in range(1, 2 if correction == "full" else draws + 1):
                grads = torch.autograd.grad(head(embeddings, labels, step=draw).loss,
                                            [embeddings, head.weight, *backbone.parameters()], retain_graph=True)
                per_draw.append(grads[:2])
                record["norms"].append(float(torch.stack([grad.norm() for grad in grads[2:]]).norm()))
                record["ratios"].append(float((grads[0] - intra).norm() / intra.norm()))
            record["embedding"].append(torch.stack([grad for grad, _ in per_draw]))
            record["centre"].append(torch.stack([grad for _, grad in per_draw]))
    stats = []
    for (rate, correction), record in drawn.items():
        norms = record["norms"]
        stats.append(GradientStats(
            rate,
            correction,
            *bias_and_noise(record["embedding"], full_embedding),
            *bias_and_noise(record["centre"], full_centre),
            float(np.mean(norms)),
            float(np.mean([norm > grad_clip for norm in norms])) if grad_clip > 0 else 0.0,
            float(np.mean(record["ratios"])),
        ))
    return stats


def intra_gradient(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, params: SFaceParams):
    """∂(intra term)/∂embeddings: the positives' share of the SFace gradient, the same for every correction."""
    x_hat = torch.nn.functional.normalize(embeddings, dim=1)
    cos = (x_hat * torch.nn.functional.normalize(weight[labels], dim=1)).sum(dim=1)
    r_intra, _ = sigmoid_weights(cos, params)
    loss = -(params.s * r_intra * cos).mean()
    return torch.autograd.grad(loss, embeddings, retain_graph=True)[0]


def bias_and_noise(drawn: list[torch.Tensor], full: list[torch.Tensor]) -> tuple[float, float]:
    """Relative bias and noise of the draws [K, ...] against the full gradient, pooled over batches."""
    bias = sum(float((d.mean(0) - f).pow(2).sum()) for d, f in zip(drawn, full, strict=True))
    noise = sum(float((d - d.mean(0)).pow(2).sum(dim=tuple(range(1, d.dim()))).mean()) for d in drawn)
    scale = sum(float(f.pow(2).sum()) for f in full)
    return (bias / scale) ** 0.5, (noise / scale) ** 0.5


def write_diagnostics(out: Path, run_dir: Path, root: Path, variants: list[Variant], args: argparse.Namespace) -> None:
    rates = sorted({v.rate for v in variants if v.head == "sface" and v.rate < 1.0})
    lines = [
        f"Gradient estimators at `{run_dir.relative_to(out)}` (the full head's final checkpoint), "
        f"{args.diagnose_batches} batches x {args.diagnose_draws} draws, one process over all classes. "
        "Bias and noise are relative to the norm of the full head's gradient on the same batches.",
        "",
        "| rate | correction | embedding bias | embedding noise | centre bias | centre noise | "
        "backbone grad norm | clipped | inter/intra |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    batch = int(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["batch_size"]) * args.nproc
    for stat in gradient_statistics(run_dir, root, rates, list(choices(SampleCorrection)), args.diagnose_draws,
                                    args.diagnose_batches, batch):
        label = "1 (full head)" if stat.correction == "full" else f"{stat.rate:g}"
        lines.append(f"| {label} | {stat.correction} | {stat.embedding_bias:.3f} | {stat.embedding_noise:.3f} | "
                     f"{stat.centre_bias:.3f} | {stat.centre_noise:.3f} | {stat.backbone_norm:.2f} | "
                     f"{stat.clipped:.2f} | {stat.inter_intra:.2f} |")
    (out / "diagnostics.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="study folder (rerun to continue)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="base training config (default: configs/demo.yaml)")
    parser.add_argument("--data", type=Path, help="dataset folder with train.rec and heldout.bin "
                        "(default: data/demo, or OUT/data with --quick; rendered when missing)")
    parser.add_argument("--variants", nargs="+", help="HEAD:RATE[:CORRECTION[:UPDATE[:CLIP]]] (default: all 13)")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: 0 1 2)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 1500, the demo's 12 epochs)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint interval (default: --steps)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run, launched with torchrun (default: 2)")
    parser.add_argument("--quick", action="store_true", help="three variants, one seed, 30 steps on a small set")
    parser.add_argument("--diagnose", action="store_true", help="measure the gradient estimators (diagnostics.md)")
    parser.add_argument("--diagnose-draws", type=int, default=32, help="draws per batch for --diagnose")
    parser.add_argument("--diagnose-batches", type=int, default=4, help="batches for --diagnose")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every run (repeatable)")
    args = parser.parse_args(argv)
    args.data = args.data or (args.out / "data" if args.quick else ROOT / "data" / "demo")
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps if args.steps is not None else (30 if args.quick else 1500)
    if args.quick:
        args.overrides = [f"data.batch_size={QUICK_BATCH}", *args.overrides]
    return run_cli(lambda: study(args), also=(RuntimeError, subprocess.CalledProcessError),
                   interrupted="interrupted: run the same command again to continue")


def study(args: argparse.Namespace) -> int:
    """Run (or continue) the study ``args`` describe and write its report."""
    texts = args.variants or (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)
    variants = [parse_variant(text) for text in texts]
    if args.steps < 1 or not args.seeds or args.nproc < 1:
        raise ValueError(f"--steps, --seeds and --nproc must be positive, got {args.steps}, {args.seeds}, "
                         f"{args.nproc}")
    results = run_study(args, variants)
    print(f"{len(results)} runs: {args.out / 'report.md'}, {args.out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
