"""tools/sampling_study.py: two variants end to end, the report against each run's own log, the gradient
diagnostics against the definitions of the corrections, and resuming."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRAWS = 8
STUDY = [sys.executable, "tools/sampling_study.py", "--quick", "--nproc", "1", "--steps", "20",
         "--variants", "sface:1", "sface:0.3:none", "--diagnose", "--diagnose-draws", str(DRAWS),
         "--diagnose-batches", "1"]


def run_study(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STUDY, "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sampling")
    result = run_study(out)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_report_holds_every_run_as_its_log_shows_it(study: tuple[Path, str]) -> None:
    out, log = study
    assert "[1/2] sface-full-seed0" in log and "[2/2] sface-0.3-none-rows-seed0" in log
    with open(out / "results.csv") as f:
        rows = {row["variant"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"sface-full", "sface-0.3-none-rows"}
    report = (out / "report.md").read_text()
    for name, row in rows.items():
        result = json.loads((out / "runs" / f"{name}-seed0" / "result.json").read_text())
        assert float(row["accuracy"]) == pytest.approx(result["accuracy"])
        # The last training line of the run's own log carries the accuracy the report reads from TensorBoard.
        train_log = (out / "runs" / f"{name}-seed0" / "train.log").read_text()
        last = re.findall(r"^step 20/20 .* acc ([0-9.]+) ", train_log, re.MULTILINE)
        assert last and float(last[0]) == pytest.approx(result["train_accuracy_end"], abs=5e-4)
        assert f"| {name} | {100 * result['accuracy']:.2f} |" in report
    config = (out / "runs" / "sface-0.3-none-rows-seed0" / "run" / "config.yaml").read_text()
    assert "sample_rate: 0.3" in config and "sample_correction: none" in config and "sample_update: rows" in config
    assert (out / "curves.png").stat().st_size > 10_000


def _diagnostics(out: Path) -> dict[str, list[float]]:
    rows = {}
    for line in (out / "diagnostics.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 9 and cells[1] in ("full", "none", "inverse_rate", "inverse_rate_centres",
                                            "inverse_rate_embeddings"):
            rows[cells[1]] = [float(cell) for cell in cells[2:]]
    return rows


def test_diagnostics_follow_the_definitions_of_the_corrections(study: tuple[Path, str]) -> None:
    """Columns: embedding bias, noise, centre bias, noise, backbone norm, clipped, inter/intra."""
    rows = _diagnostics(study[0])
    assert rows["full"][:4] == [0.0, 0.0, 0.0, 0.0]
    none, inverse = rows["none"], rows["inverse_rate"]
    assert none[1] > 0 and inverse[1] > none[1], "rescaled negatives must add noise"
    # One-sided corrections take the embedding side of one and the centre side of the other.
    assert rows["inverse_rate_centres"][:2] == none[:2] and rows["inverse_rate_centres"][2:4] == inverse[2:4]
    assert rows["inverse_rate_embeddings"][:2] == inverse[:2] and rows["inverse_rate_embeddings"][2:4] == none[2:4]
    # inverse_rate is unbiased: the mean of DRAWS draws misses by about noise / sqrt(DRAWS).
    assert inverse[0] < 3 * inverse[1] / DRAWS**0.5


def test_rerun_trains_only_what_is_missing(study: tuple[Path, str]) -> None:
    out, _ = study
    again = run_study(out)
    assert again.returncode == 0, again.stderr
    assert "[1/2]" not in again.stdout and "[2/2]" not in again.stdout
    (out / "runs" / "sface-full-seed0" / "result.json").unlink()
    once_more = run_study(out)
    assert once_more.returncode == 0, once_more.stderr
    assert "[1/2] sface-full-seed0" in once_more.stdout and "[2/2]" not in once_more.stdout


def test_other_settings_in_the_same_folder_are_refused(study: tuple[Path, str]) -> None:
    """Another budget into the same --out: one line naming what differs, nothing trained."""
    out, _ = study
    again = run_study(out, "--steps", "25")
    folder = out / "runs" / "sface-full-seed0"
    assert again.returncode == 1 and "[1/2]" not in again.stdout
    assert again.stderr == (f"error: {folder}: made with other settings (steps: 20 -> 25): choose another --out for "
                            f"these settings, or delete {folder} to make it again\n")


@pytest.mark.parametrize(
    ("variant", "message"),
    [("sface:1.5", "rate 1.5 is not in [0, 1]"), ("sface:0.3:half", "correction 'half'")],
)
def test_a_bad_variant_is_one_line_naming_it(tmp_path: Path, variant: str, message: str) -> None:
    result = subprocess.run([sys.executable, "tools/sampling_study.py", "--out", str(tmp_path), "--variants", variant],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
