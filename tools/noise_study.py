"""Does the loss resist label noise? Train each head type on noisy copies of a dataset and compare.

    python tools/noise_study.py --out study/demo                        # synthetic demo data, ~21 min on 2 cores
    python tools/noise_study.py --out study/quick --quick               # a smoke test, under a minute
    python tools/noise_study.py --out study/cleaning --heads sface arcface subcenter-arcface --clean
    python tools/noise_study.py --out study/mine --rec data/mine/train.rec --bin data/mine/lfw.bin \\
        --hold-out 500 --nproc 8 --set model.backbone=iresnet50 --steps 20000

The dataset's last ``--hold-out`` identities are set aside as the outside world. For each
noise type (closed: images relabelled to another identity of the set; open: images of the
outside identities added under labels of the set), ratio and seed, a noisy copy is written
with a manifest of every corrupted record (``OUT/data/<noise>-<ratio>-seed<seed>/``). Each
head type is trained on each copy through ``sface_dist.train`` with the same config, budget
and seed (the backbone compiled by ``torch.compile`` unless ``--no-compile``), evaluated on
the clean held-out pack, and the noisy-label finder is run on its final checkpoint and
scored against the manifest. ``subcenter-arcface`` is ArcFace with 3
sub-centres a class, dropped to the dominant one after ``--drop-epoch``; ``HEAD+clean`` is cleaned
inside the run after ``--clean-epoch`` (outlier rule) and ``--finder-epoch`` (the finder's rule)
within the same step budget (``--clean`` adds every head so); ``HEAD+hand-cleaned`` trains on the
noisy copy without its planted images.

``OUT/report.md`` holds the table (mean ± std over seeds), ``OUT/results.csv`` every cell,
``OUT/accuracy.png`` accuracy against the noise ratio per loss and ``OUT/target_cosine.png``
the training images' cosine to the centre of the label they were given, clean against
corrupted. A cell with ``OUT/cells/<cell>/result.json`` is not trained again: rerun the
same command to continue an interrupted study, or with more heads, seeds or ratios to
extend it. ``OUT/study.json`` records what the data are made from and each cell's
``settings.json`` what trained it (config file and digest, overrides, steps, ranks, code
version): a folder made with other settings is refused, so one ``--out`` holds one study.
"""


from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from study_runs import (
    FAILED,
    claim_study,
    dataset_identity,
    file_identity,
    launch_training,
    mean_std,
    render_synthetic,
    run_each,
    write_json,
)

from sface_dist.cli import run_cli
from sface_dist.config import HeadType, choices
from sface_dist.data.bin_pack import VerificationPack, read_bin
from sface_dist.data.convert import repack
from sface_dist.data.dataset_checks import dataset_rec_path
from sface_dist.data.dataset_edits import add_label_noise, hold_out_identities
from sface_dist.evaluation.cli import default_device
from sface_dist.evaluation.embedder import open_model
from sface_dist.evaluation.noisy_labels import DEFAULT_THRESHOLD, LabelScores, find_noisy_labels
from sface_dist.evaluation.verification import evaluate_embedder
from sface_dist.heads.margin import MARGIN_TYPES
from sface_dist.parallel.launch import DistEnv

ROOT = Path(__file__).resolve().parents[1]
REPORT_FAR = "1e-03"
MAX_JOBS = 4
"""The default's cap on concurrent runs: the synthetic study's runs are small, a core each is enough."""


@dataclass(frozen=True)
class Grid:
    """What the study trains: every head on every (noise, ratio) for every seed, and the shared budget."""

    heads: tuple[str, ...]
    noises: tuple[str, ...]
    ratios: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: int
    identities: int
    images: int
    hold_out: int
    pairs: int = 3000
    """Verification pairs of the synthetic held-out pack."""
    clean_epoch: int = 2
    """After which epoch the ``+clean`` heads are cleaned with the outlier rule."""
    finder_epoch: int = 6
    """After which epoch the ``+clean`` heads are cleaned again, with the finder's rule (0: not again)."""
    drop_epoch: int = 6
    """After which epoch ``subcenter-arcface`` drops its sub-centres."""
    compile: bool = True
    """``torch.compile`` every run's backbone: runs of one shape share the compiled kernels (torch's cache), so the
    compilation is paid once and each step after it is cheaper; a 40-step smoke test does not earn it back."""


DEFAULT = Grid(("sface", "arcface", "subcenter-arcface", "sface+clean", "sface+hand-cleaned"), ("closed", "open"),
               (0.0, 0.2, 0.4),
               (0, 1, 2), steps=600, identities=200, images=20, hold_out=100)
FULL = replace(DEFAULT, heads=tuple(head + suffix for suffix in ("", "+clean", "+hand-cleaned")
                                    for head in ("sface", "arcface", "cosface", "subcenter-arcface")))
QUICK = Grid(("sface", "arcface"), ("closed", "open"), (0.0, 0.2), (0,), steps=40, identities=24, images=10,
             hold_out=12, pairs=96, compile=False)


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    head: str
    noise: str
    """``clean``, ``closed`` or ``open``."""
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.head}-{self.noisy_data_name}"

    @property
    def noisy_data_name(self) -> str:
        """The noisy copy this cell's data come from."""
        return f"clean-seed{self.seed}" if self.noise == "clean" else f"{self.noise}-{self.ratio:g}-seed{self.seed}"

    @property
    def data_name(self) -> str:
        """The data this cell trains on: the noisy copy, or (``+hand-cleaned``) the copy without its planted images."""
        return self.noisy_data_name + ("-hand-cleaned" if self.head.endswith(HAND_CLEANED) else "")


SUB_CENTER_ARCFACE = "subcenter-arcface"
"""ArcFace with 3 sub-centres a class, dropped to the dominant one after the study's drop epoch."""
CLEANED = "+clean"
"""The suffix of a head cleaned inside the run."""
HAND_CLEANED = "+hand-cleaned"
"""The suffix of a head trained on the noisy copy without the images its manifest lists: the hand-cleaned set, the
reference that cleaning aims at."""


def head_overrides(head: str, grid: Grid) -> list[str]:
    """The training overrides of a study head: a head type or ``subcenter-arcface``, with ``+clean`` its cleanings
    (``+hand-cleaned`` changes the data, not the run)."""
    name = head.removesuffix(CLEANED).removesuffix(HAND_CLEANED)
    overrides = [f"head.type={name}"] if name != SUB_CENTER_ARCFACE else [
        "head.type=arcface", "head.sub_centers=3", f"head.sub_center_drop_epoch={grid.drop_epoch}"]
    if not head.endswith(CLEANED):
        return overrides
    if not grid.finder_epoch:
        return [*overrides, f"clean.at_epochs=[{grid.clean_epoch}]", "clean.rule=outlier"]
    return [*overrides, f"clean.at_epochs=[{grid.clean_epoch}, {grid.finder_epoch}]", "clean.rule=[outlier, finder]"]


def cells_of(grid: Grid) -> list[Cell]:
    """Seed-major, so that an interrupted study has whole seeds to report."""
    conditions = [("clean", 0.0)] if 0.0 in grid.ratios else []
    conditions += [(noise, ratio) for noise in grid.noises for ratio in grid.ratios if ratio > 0]
    return [Cell(head, noise, ratio, seed) for seed in grid.seeds for noise, ratio in conditions
            for head in grid.heads if noise != "clean" or not head.endswith(HAND_CLEANED)]  # fmt: skip


def prepare_source(args: argparse.Namespace, grid: Grid, out: Path) -> tuple[Path, Path]:
    """The dataset to corrupt and its held-out pack: the user's, or rendered synthetic identities."""
    if args.rec is not None:
        return dataset_rec_path(args.rec), Path(args.bin)
    source = out / "data" / "source"
    render_synthetic(source, grid.identities + grid.hold_out, grid.images, heldout=max(2, grid.identities // 2),
                     pairs=grid.pairs)
    return source / "train.rec", source / "heldout.bin"


def prepare_data(cell: Cell, kept: Path, outside: Path, data: Path) -> Path:
    """The training set of ``cell``, written once per noise, ratio and seed with ``corrupted.json``, its manifest."""
    if cell.noise == "clean":
        return kept.parent
    folder = data / cell.noisy_data_name
    manifest = folder / "corrupted.json"
    if not manifest.is_file():
        closed, opened = (cell.ratio, 0.0) if cell.noise == "closed" else (0.0, cell.ratio)
        corrupted = add_label_noise(kept, folder, closed, opened, outside, seed=cell.seed, progress=False)
        write_json(manifest, [asdict(record) for record in corrupted])
    if not cell.head.endswith(HAND_CLEANED):
        return folder
    cleaned = data / cell.data_name
    if not (cleaned / "property").is_file():
        listing = folder / "corrupted.txt"
        listing.write_text("".join(f"{record['key']}\n" for record in json.loads(manifest.read_text())))
        repack(folder, cleaned, seed=cell.seed, progress=False, exclude=listing)
    return cleaned


def train(cell: Cell, root: Path, run: Path, args: argparse.Namespace, grid: Grid, log: Path) -> None:
    """``sface_dist.train`` on ``root`` with the study's overrides."""
    overrides = [f"data.root={root}", f"train.output={run}", *head_overrides(cell.head, grid),
                 f"train.seed={cell.seed}",
                 f"train.steps={grid.steps}", "train.epochs=0", "eval.bins=[]", f"train.checkpoint_every={grid.steps}",
                 f"train.log_every={max(1, grid.steps // 10)}", *run_overrides(args, grid)]
    launch_training(args.config, overrides, args.nproc, log, f"cell {cell.name}", threads=threads_per_job(args))


def run_overrides(args: argparse.Namespace, grid: Grid) -> list[str]:
    """The config overrides of every run: the study's own, then the user's ``--set`` (which win)."""
    return [*(["model.compile=true"] if grid.compile else []), *args.overrides]


def threads_per_job(args: argparse.Namespace) -> int:
    """CPU threads for each of ``--jobs`` concurrent runs: the cores shared out (0: the run's own choice)."""
    return max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0


def run_cell(
    cell: Cell, root: Path, heldout: VerificationPack, folder: Path, args: argparse.Namespace, grid: Grid
) -> dict[str, object]:
    """Train, evaluate and run the finder for one cell; its result is written last, so a cut cell reruns."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = folder / "run"
    train(cell, root, run, args, grid, folder / "train.log")
    model = open_model(run, None, default_device())
    verification = evaluate_embedder(model.embed, heldout, batch_size=128)
    find_noisy_labels(run, folder / "finder", DistEnv(0, 1, 0, torch.device(default_device())), workers=2)
    result = {**asdict(cell), "accuracy": verification.accuracy, "accuracy_std": verification.std,
              "tar": verification.to_dict()["tar_at_far"][REPORT_FAR], "seconds": time.perf_counter() - start}
    write_json(folder / "result.json", result)
    return result


def cell_scores(out: Path, cell: Cell) -> tuple[LabelScores, np.ndarray]:
    """The finder's scores of every image of ``cell`` and which images its manifest lists as corrupted."""
    scores = np.load(out / "cells" / cell.name / "finder" / "scores.npz")
    manifest = out / "data" / cell.data_name / "corrupted.json"
    planted_keys = [record["key"] for record in json.loads(manifest.read_text())] if manifest.is_file() else []
    fields = ("own", "nearest", "nearest_class", "identity")
    return LabelScores(*(scores[name] for name in fields)), np.isin(scores["key"], planted_keys)


def finder_counts(out: Path, cell: Cell) -> dict[str, int]:
    """The finder's default suspects in ``cell``, against the manifest of its data."""
    scores, planted = cell_scores(out, cell)
    found = np.zeros(len(planted), dtype=bool)
    found[scores.suspects(DEFAULT_THRESHOLD)] = True
    return {"images": len(planted), "corrupted": int(planted.sum()), "suspects": int(found.sum()),
            "found": int((found & planted).sum())}


def study_settings(args: argparse.Namespace, grid: Grid) -> dict[str, object]:
    """What the study's data are made from: the user's dataset and pack, or the synthetic grid; the hold-out."""
    if args.rec is not None:
        data: dict[str, object] = {**dataset_identity(dataset_rec_path(args.rec)), "bin": file_identity(args.bin)}
    else:
        data = {"synthetic_identities": grid.identities, "synthetic_images": grid.images, "pairs": grid.pairs}
    return {"tool": "noise_study", "data": data, "hold_out": grid.hold_out}


def cell_settings(cell: Cell, args: argparse.Namespace, grid: Grid) -> dict[str, object]:
    """Everything that determines a cell's result besides the study's data."""
    settings = {**asdict(cell), "steps": grid.steps, "nproc": args.nproc, "config": file_identity(args.config),
                "overrides": run_overrides(args, grid)}
    if cell.head.endswith(CLEANED):
        settings["clean_epoch"] = grid.clean_epoch
        settings["finder_epoch"] = grid.finder_epoch
    if cell.head.startswith(SUB_CENTER_ARCFACE):
        settings["drop_epoch"] = grid.drop_epoch
    return settings


def run_study(args: argparse.Namespace, grid: Grid) -> list[dict[str, object]]:
    out: Path = args.out
    claim_study(out, study_settings(args, grid))
    rec, heldout_path = prepare_source(args, grid, out)
    kept_rec, outside_rec = out / "data" / "kept" / "train.rec", out / "data" / "outside" / "train.rec"
    if not (outside_rec.with_name("property").is_file() and kept_rec.with_name("property").is_file()):
        hold_out_identities(rec, out / "data", grid.hold_out, progress=False)
    heldout = read_bin(heldout_path)  # decoded once: every cell is evaluated on the same pack
    cells = cells_of(grid)
    roots = [prepare_data(cell, kept_rec, outside_rec, out / "data") for cell in cells]

    def run(index: int) -> dict[str, object]:
        cell = cells[index]
        return {**run_cell(cell, roots[index], heldout, out / "cells" / cell.name, args, grid),
                **finder_counts(out, cell)}

    def summary(result: dict[str, object]) -> str:
        return (f"accuracy {result['accuracy']:.4f}, TAR@FAR={REPORT_FAR} {result['tar']:.4f}, {result['suspects']} "
                f"suspects ({result['found']} of {result['corrupted']} corrupted) in {result['seconds']:.0f} s")

    results = run_each([(cell.name, out / "cells" / cell.name, cell_settings(cell, args, grid)) for cell in cells],
                       run, summary, lambda index, result: {**result, **finder_counts(out, cells[index])},
                       parallel=args.jobs, keep_going=True)
    results = [{**asdict(cells[index]), **result} for index, result in enumerate(results)]
    write_report(out, results, grid, describe_setup(args, grid, out, cells))
    return results


def describe_setup(args: argparse.Namespace, grid: Grid, out: Path, cells: list[Cell]) -> str:
    """The base config, the overrides of every run and the heads' resolved settings, for the report."""
    overrides = ", ".join(f"`{item}`" for item in run_overrides(args, grid)) or "none"
    heads = {}
    for cell in {cell.head: cell for cell in cells}.values():
        config = yaml.safe_load((out / "cells" / cell.name / "run" / "config.yaml").read_text())
        head = config["head"]
        if head["type"] == "sface":
            described = ", ".join(f"{key} {head[key]}" for key in ("s", "k", "a", "b"))
        else:
            margins = head["margin"] or list(MARGIN_TYPES[head["type"]])
            described = f"s {head['s']}, (m1, m2, m3) {tuple(margins)}, margin_grad {head['margin_grad']}"
        if head.get("sub_centers", 1) > 1:
            described += f", {head['sub_centers']} sub-centres dropped after epoch {head['sub_center_drop_epoch']}"
        if config.get("clean", {}).get("at_epochs"):
            epochs, rules = config["clean"]["at_epochs"], config["clean"]["rule"]
            rules = rules if isinstance(rules, list) else [rules] * len(epochs)
            described += ", cleaned after " + " and ".join(
                f"epoch {epoch} ({rule} rule)" for epoch, rule in zip(epochs, rules, strict=True))
        if cell.head.endswith(HAND_CLEANED):
            described += ", trained on the noisy copy without its planted images"
        heads[cell.head] = described
    described = "; ".join(f"{name}: {values}" for name, values in heads.items())
    return f"Config `{args.config.name}`, overrides for every run: {overrides}. Heads: {described}."


def write_report(out: Path, results: list[dict[str, object]], grid: Grid, setup: str) -> None:
    """``results.csv``, ``report.md`` and the two figures; the header says what the reported cells were made with,
    and the runs that failed are listed with why."""
    trained = [result for result in results if FAILED not in result]
    failed = [result for result in results if FAILED in result]
    with open(out / "results.csv", "w", newline="") as f:
        fields = [key for key in (trained or results)[0] if key not in ("settings", FAILED)]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(trained)
    groups: dict[tuple[str, float, str], list[dict[str, object]]] = {}
    for result in trained:
        groups.setdefault((str(result["noise"]), float(result["ratio"]), str(result["head"])), []).append(result)
    failed_groups = Counter((str(result["noise"]), float(result["ratio"]), str(result["head"])) for result in failed)
    steps = " or ".join(str(value) for value in sorted({int(result["settings"]["steps"]) for result in results}))
    seeds = ", ".join(str(value) for value in sorted({int(result["seed"]) for result in results}))
    code = ", ".join(sorted({str(result["code"]) for result in results}))
    lines = [
        f"{len(results)} runs: {steps} steps each, seeds {seeds}, code {code}; mean ± std over "
        f"seeds. Finder: its default suspects (another centre nearer, or identity cosine < {DEFAULT_THRESHOLD}) "
        "against the manifest.",
        "",
        setup,
        "",
        f"| noise | ratio | loss | accuracy (%) | TAR@FAR={REPORT_FAR} (%) | suspects (%) | finder precision | "
        "finder recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for noise, ratio, head in sorted({*groups, *failed_groups}, key=lambda key: (key[0] != "clean", key)):
        rows = groups.get((noise, ratio, head), [])
        if not rows:
            lines.append(f"| {noise} | {ratio:g} | {head} | failed | - | - | - | - |")
            continue
        accuracy = mean_std([float(row["accuracy"]) for row in rows])
        if (noise, ratio, head) in failed_groups:
            accuracy += f" ({len(rows)} of {len(rows) + failed_groups[(noise, ratio, head)]} seeds)"
        tar = mean_std([float(row["tar"]) for row in rows])
        suspects = mean_std([int(row["suspects"]) / int(row["images"]) for row in rows])
        found, flagged, corrupted = (sum(int(row[key]) for row in rows) for key in ("found", "suspects", "corrupted"))
        precision = f"{found / flagged:.3f}" if corrupted and flagged else "-"
        recall = f"{found / corrupted:.3f}" if corrupted else "-"
        lines.append(f"| {noise} | {ratio:g} | {head} | {accuracy} | {tar} | {suspects} | {precision} | {recall} |")
    lines += ["", *gap_table(groups)]
    if failed:
        lines += ["", "Runs that failed (a rerun tries them again):", ""]
        lines += [f"- {result['head']}, {result['noise']} {float(result['ratio']):g}, seed {result['seed']}: "
                  f"{str(result[FAILED]).split(' (log: ')[0]}" for result in failed]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_accuracy(out / "accuracy.png", groups, grid)
    plot_target_cosines(out / "target_cosine.png", out, grid)


def gap_table(groups: dict[tuple[str, float, str], list[dict[str, object]]]) -> list[str]:
    """Each head's mean accuracy on each noisy copy against its own on clean data (a ``+hand-cleaned`` head against
    its base head's), in points: what the noise costs after what the pipeline does against it."""
    def mean(rows: list[dict[str, object]]) -> float:
        return 100 * float(np.mean([float(row["accuracy"]) for row in rows]))

    conditions = sorted({(noise, ratio) for noise, ratio, _ in groups if noise != "clean"})
    heads = list(dict.fromkeys(head for _, _, head in groups))
    lines = ["Points of held-out accuracy against the same loss on clean data (a hand-cleaned row against its "
             "loss's clean runs):", "",
             "| loss | " + " | ".join(f"{noise} {ratio:g}" for noise, ratio in conditions) + " |",
             "|---|" + "---|" * len(conditions)]
    for head in heads:
        clean = groups.get(("clean", 0.0, head)) or groups.get(("clean", 0.0, head.removesuffix(HAND_CLEANED)))
        cells = [f"{mean(groups[(noise, ratio, head)]) - mean(clean):+.2f}"
                 if clean and (noise, ratio, head) in groups else "-" for noise, ratio in conditions]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return lines


def plot_accuracy(path: Path, groups: dict[tuple[str, float, str], list[dict[str, object]]], grid: Grid) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(grid.noises), figsize=(5 * len(grid.noises), 4), squeeze=False)
    for axis, noise in zip(axes[0], grid.noises):
        for head in grid.heads:
            keys = [("clean" if ratio == 0 else noise, ratio, head) for ratio in grid.ratios]
            points = [(key[1], [100 * float(row["accuracy"]) for row in groups[key]]) for key in keys if key in groups]
            if points:
                means, spreads = [np.mean(values) for _, values in points], [np.std(values) for _, values in points]
                axis.errorbar([ratio for ratio, _ in points], means, yerr=spreads, marker="o", capsize=3, label=head)
        axis.set(title=f"{noise}-set noise", xlabel="noise ratio", ylabel="held-out accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_target_cosines(path: Path, out: Path, grid: Grid) -> None:
    """Histograms of the cosine to the given label's centre, clean vs corrupted images, first seed, per loss."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    conditions = [(noise, ratio) for noise in grid.noises for ratio in grid.ratios if ratio > 0]
    heads = [head for head in grid.heads if not head.endswith(HAND_CLEANED)]
    size = (3.6 * len(conditions), 2.6 * len(heads))
    figure, axes = plt.subplots(len(heads), len(conditions), figsize=size, squeeze=False, sharex=True)
    bins = np.linspace(-0.4, 1.0, 57)
    for row, head in enumerate(heads):
        for column, (noise, ratio) in enumerate(conditions):
            axis = axes[row][column]
            cell = Cell(head, noise, ratio, grid.seeds[0])
            if not (out / "cells" / cell.name / "finder" / "scores.npz").is_file():
                axis.set_title(f"{head}, {noise} {ratio:g}: failed", fontsize=9)
                continue
            scores, planted = cell_scores(out, cell)
            axis.hist(scores.own[~planted], bins=bins, density=True, alpha=0.6, label="clean")
            axis.hist(scores.own[planted], bins=bins, density=True, alpha=0.6, label="corrupted")
            axis.set_title(f"{head}, {noise} {ratio:g}", fontsize=9)
            if row == len(heads) - 1:
                axis.set_xlabel("cosine to the given label's centre")
            if row == 0 and column == 0:
                axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_grid(args: argparse.Namespace) -> Grid:
    base = QUICK if args.quick else FULL if args.full else DEFAULT
    grid = Grid(
        heads=tuple(args.heads or base.heads),
        noises=tuple(args.noise or base.noises),
        ratios=tuple(sorted(set(args.ratios if args.ratios is not None else base.ratios))),
        seeds=tuple(args.seeds if args.seeds is not None else base.seeds),
        steps=base.steps if args.steps is None else args.steps,
        identities=base.identities,
        images=base.images,
        hold_out=base.hold_out if args.hold_out is None else args.hold_out,
        pairs=base.pairs,
        clean_epoch=base.clean_epoch if args.clean_epoch is None else args.clean_epoch,
        finder_epoch=base.finder_epoch if args.finder_epoch is None else args.finder_epoch,
        drop_epoch=base.drop_epoch if args.drop_epoch is None else args.drop_epoch,
        compile=base.compile if args.compile is None else args.compile,
    )
    if args.clean:
        cleaned = [head + CLEANED for head in grid.heads if not head.endswith((CLEANED, HAND_CLEANED))]
        grid = replace(grid, heads=tuple(dict.fromkeys((*grid.heads, *cleaned))))
    if not grid.seeds or not grid.ratios or any(not 0.0 <= ratio <= 1.0 for ratio in grid.ratios):
        raise ValueError(f"need seeds and ratios in [0, 1], got seeds {grid.seeds}, ratios {grid.ratios}")
    if not any(ratio > 0 for ratio in grid.ratios):
        raise ValueError(f"--ratios {' '.join(f'{r:g}' for r in grid.ratios)}: no noisy condition to compare "
                         "(give a ratio above 0)")
    if grid.finder_epoch and grid.finder_epoch <= grid.clean_epoch:
        raise ValueError(f"--finder-epoch {grid.finder_epoch}: the second cleaning comes after the first "
                         f"(--clean-epoch {grid.clean_epoch}), or 0 for none")
    if grid.clean_epoch < 1 or grid.drop_epoch < 1:
        raise ValueError(f"--clean-epoch and --drop-epoch must be at least 1, got {grid.clean_epoch}, "
                         f"{grid.drop_epoch}")
    if grid.steps < 1 or grid.hold_out < 1:
        raise ValueError(f"--steps and --hold-out must be positive, got {grid.steps}, {grid.hold_out}")
    if args.rec is None and grid.hold_out > grid.identities:
        raise ValueError(f"--hold-out {grid.hold_out}: more than the {grid.identities} synthetic identities trained "
                         "on; the outside world is rendered too, so hold out at most as many")
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="study folder (rerun to continue)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="base training config (default: configs/demo.yaml)")
    parser.add_argument("--rec", help="dataset folder or .rec to corrupt "
                        "(default: synthetic identities rendered into OUT/data)")
    parser.add_argument("--bin", help="clean held-out verification pack for --rec")
    parser.add_argument("--hold-out", type=int, help="identities set aside for open-set noise (default: 100)")
    heads = (*choices(HeadType), SUB_CENTER_ARCFACE)
    parser.add_argument("--heads", nargs="+", choices=[head + suffix for suffix in ("", CLEANED, HAND_CLEANED)
                                                       for head in heads], metavar="HEAD",
                        help=f"head types or subcenter-arcface, each optionally HEAD{CLEANED} (cleaned inside the run) "
                        f"or HEAD{HAND_CLEANED} (trained on the noisy copy without its planted images) "
                        f"(default: {' '.join(DEFAULT.heads)}; --full: {' '.join(FULL.heads)})")
    parser.add_argument("--full", action="store_true", help="the full grid: every head with and without cleaning")
    parser.add_argument("--clean", action="store_true",
                        help="also train every head cleaned inside the run (HEAD+clean), in the same budget")
    parser.add_argument("--clean-epoch", type=int,
                        help="after which epoch the +clean heads clean with the outlier rule "
                        f"(default: {DEFAULT.clean_epoch})")
    parser.add_argument("--finder-epoch", type=int,
                        help="after which epoch the +clean heads clean again with the finder's rule, 0: not again "
                        f"(default: {DEFAULT.finder_epoch})")
    parser.add_argument("--drop-epoch", type=int,
                        help="after which epoch subcenter-arcface drops its sub-centres "
                        f"(default: {DEFAULT.drop_epoch})")
    parser.add_argument("--noise", nargs="+", choices=("closed", "open"), help="noise types (default: both)")
    parser.add_argument("--ratios", nargs="+", type=float, help="noise ratios (default: 0 0.2 0.4)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds of noise and training (default: 0 1 2)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 600)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run, launched with torchrun (default: 1)")
    parser.add_argument("--jobs", type=int, help="runs at a time, sharing the CPU cores (default: the cores, at most "
                        f"{MAX_JOBS}, on the synthetic data; 1 with --rec)")
    parser.add_argument("--quick", action="store_true", help="a small grid on a small synthetic set")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile every run's backbone (model.compile=true; default: on, off with --quick; "
                        "on a CPU it needs a C++ compiler)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every run (repeatable)")
    args = parser.parse_args(argv)
    if (args.rec is None) != (args.bin is None):
        parser.error("--rec and --bin go together")
    if args.jobs is None:
        args.jobs = 1 if args.rec is not None else max(1, min(MAX_JOBS, os.cpu_count() or 1))
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return run_cli(lambda: study(args), also=(RuntimeError, subprocess.CalledProcessError),
                   interrupted="interrupted: run the same command again to continue")


def study(args: argparse.Namespace) -> int:
    """Run (or continue) the study ``args`` describe and write its report."""
    results = run_study(args, parse_grid(args))
    failed = sum(FAILED in result for result in results)
    print(f"{len(results)} runs{f' ({failed} failed)' if failed else ''}: {args.out / 'report.md'}, "
          f"{args.out / 'accuracy.png'}, {args.out / 'target_cosine.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
