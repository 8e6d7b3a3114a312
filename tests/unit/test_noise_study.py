"""tools/noise_study.py: a small grid end to end, its report against the finder's own files, and resuming."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sface_dist.evaluation.image_sources import RecordImages

ROOT = Path(__file__).resolve().parents[2]
STUDY = [sys.executable, "tools/noise_study.py", "--quick", "--heads", "sface", "--noise", "closed", "--steps", "20"]


def run_study(out: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*STUDY, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("study")
    return out, run_study(out).stdout


def read_results(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_study_reports_every_cell_with_the_finders_own_counts(study: tuple[Path, str]) -> None:
    out, log = study
    assert "[1/2] sface-clean-seed0" in log and "[2/2] sface-closed-0.2-seed0" in log
    rows = {row["noise"]: row for row in read_results(out)}
    assert set(rows) == {"clean", "closed"}
    manifest = json.loads((out / "data" / "closed-0.2-seed0" / "corrupted.json").read_text())
    planted = {record["key"] for record in manifest}
    assert len(planted) == round(0.2 * 24 * 10) and {record["kind"] for record in manifest} == {"closed"}
    cells = {"clean": "sface-clean-seed0", "closed": "sface-closed-0.2-seed0"}
    for noise, row in rows.items():
        with open(out / "cells" / cells[noise] / "finder" / "suspects.csv") as f:
            suspects = {int(line["key"]) for line in csv.DictReader(f)}
        expected_planted = planted if noise == "closed" else set()
        assert int(row["suspects"]) == len(suspects)
        assert int(row["found"]) == len(suspects & expected_planted)
        assert int(row["corrupted"]) == len(expected_planted)
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["tar"]) <= 1.0
    report = (out / "report.md").read_text()
    assert "| clean | 0 | sface |" in report and "| closed | 0.2 | sface |" in report
    closed = rows["closed"]
    precision, recall = int(closed["found"]) / int(closed["suspects"]), int(closed["found"]) / len(planted)
    assert f"| {precision:.3f} | {recall:.3f} |" in report
    for figure in ("accuracy.png", "target_cosine.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_trains_only_the_cells_without_a_result(study: tuple[Path, str]) -> None:
    out, _ = study
    before = read_results(out)
    assert "[" not in run_study(out).stdout
    assert read_results(out) == before
    (out / "cells" / "sface-closed-0.2-seed0" / "result.json").unlink()
    log = run_study(out).stdout
    assert "[2/2] sface-closed-0.2-seed0" in log and "[1/2]" not in log
    assert len(read_results(out)) == 2


@pytest.mark.parametrize(("other", "differs"), [
    ([], "made with other settings (data.synthetic_identities: 24 -> 200; data.synthetic_images: 10 -> 20; "
         "data.pairs: 96 -> 3000 (and 1 more))"),
    (["--quick", "--steps", "30"], "made with other settings (steps: 20 -> 30)"),
])
def test_a_study_with_other_settings_is_refused_in_the_same_folder(
    study: tuple[Path, str], other: list[str], differs: str
) -> None:
    """The full grid, or other steps, into a quick study's folder: refused before anything is trained or written,
    naming what differs; the report stays the quick study's."""
    out, _ = study
    files = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    command = [sys.executable, "tools/noise_study.py", *other, "--heads", "sface", "--noise", "closed",
               "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "[1/" not in result.stdout
    folder = out if not other else out / "cells" / "sface-clean-seed0"
    assert result.stderr == (f"error: {folder}: {differs}: choose another --out for these settings, or delete "
                             f"{folder} to make it again\n")
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()} == files


def test_the_report_header_comes_from_the_cells(study: tuple[Path, str]) -> None:
    out, _ = study
    settings = json.loads((out / "cells" / "sface-clean-seed0" / "settings.json").read_text())
    assert settings["settings"]["steps"] == 20 and settings["settings"]["config"]["path"].endswith("demo.yaml")
    assert (out / "report.md").read_text().startswith(f"2 runs: 20 steps each, seeds 0, code {settings['code']};")


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run([*STUDY, "--out", str(tmp_path), "--ratios", "1.5"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == "error: need seeds and ratios in [0, 1], got seeds (0,), ratios (1.5,)\n"


def test_sub_center_arcface_cleaning_and_the_hand_cleaned_set_are_cells_of_the_study(tmp_path: Path) -> None:
    """``--heads subcenter-arcface sface+hand-cleaned --clean``: sub-center ArcFace as is and cleaned, dropping its
    sub-centres after ``--drop-epoch`` and cleaning after ``--clean-epoch`` (outlier rule) and ``--finder-epoch``
    (the finder's) within the same step budget, and SFace
    on the noisy copy without the images its manifest lists; the report names what each row ran. The backbones are
    compiled as in the default grid (``--compile``: inductor's CPU kernels, the training and the evaluation mode)."""
    command = [sys.executable, "tools/noise_study.py", "--quick", "--heads", "subcenter-arcface", "sface+hand-cleaned",
               "--clean", "--noise", "closed", "--ratios", "0.2", "--steps", "40", "--drop-epoch", "8",
               "--clean-epoch", "7", "--finder-epoch", "9", "--compile", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = {(row["noise"], row["head"]) for row in read_results(tmp_path)}
    assert rows == {("closed", "subcenter-arcface"), ("closed", "subcenter-arcface+clean"),
                    ("closed", "sface+hand-cleaned")}
    for cell in ("subcenter-arcface-closed-0.2-seed0", "subcenter-arcface+clean-closed-0.2-seed0"):
        log = (tmp_path / "cells" / cell / "train.log").read_text()
        assert "sub-centres dropped after epoch 8" in log and "step 40/40" in log
        cleaned = cell.startswith("subcenter-arcface+clean")
        assert ("cleaning after epoch 7" in log) == ("cleaning after epoch 9" in log) == cleaned
        settings = json.loads((tmp_path / "cells" / cell / "settings.json").read_text())["settings"]
        assert settings["steps"] == 40 and settings["drop_epoch"] == 8
        assert settings["overrides"] == ["model.compile=true"]
        assert yaml.safe_load((tmp_path / "cells" / cell / "run" / "config.yaml").read_text())["model"]["compile"]
        assert (settings.get("clean_epoch"), settings.get("finder_epoch")) == ((7, 9) if cleaned else (None, None))
    planted = {record["key"] for record in json.loads(
        (tmp_path / "data" / "closed-0.2-seed0" / "corrupted.json").read_text())}
    noisy = RecordImages(tmp_path / "data" / "closed-0.2-seed0")
    hand_cleaned = RecordImages(tmp_path / "data" / "closed-0.2-seed0-hand-cleaned")
    assert len(planted) == 48 and len(hand_cleaned) == len(noisy) - len(planted)
    run_config = (tmp_path / "cells" / "sface+hand-cleaned-closed-0.2-seed0" / "run" / "config.yaml").read_text()
    assert "closed-0.2-seed0-hand-cleaned" in run_config
    report = (tmp_path / "report.md").read_text()
    assert "overrides for every run: `model.compile=true`." in report
    assert "subcenter-arcface: s 64.0, (m1, m2, m3) (1.0, 0.5, 0.0), margin_grad cos, 3 sub-centres dropped after " \
           "epoch 8" in report
    assert "subcenter-arcface+clean: " in report
    assert ", cleaned after epoch 7 (outlier rule) and epoch 9 (finder rule)" in report
    assert "sface+hand-cleaned: " in report and "without its planted images" in report
    assert "| closed | 0.2 | sface+hand-cleaned | " in report
    assert "| closed | 0.2 | subcenter-arcface+clean |" in report


def test_a_run_that_fails_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    """A sub-centre drop at an angle no image is within stops that run (one line naming the keys); the study
    trains the other run, reports the failure in report.md, exits 0, and a rerun tries the failed run again."""
    command = [sys.executable, "tools/noise_study.py", "--quick", "--heads", "subcenter-arcface", "sface", "--noise",
               "closed", "--ratios", "0.2", "--steps", "30", "--drop-epoch", "1", "--jobs", "1",
               "--set", "head.sub_center_drop_degrees=0.01", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "2 runs (1 failed): " in result.stdout
    assert [row["head"] for row in read_results(tmp_path)] == ["sface"]
    report = (tmp_path / "report.md").read_text()
    assert "| closed | 0.2 | subcenter-arcface | failed | - | - | - | - |" in report
    assert ("- subcenter-arcface, closed 0.2, seed 0: cell subcenter-arcface-closed-0.2-seed0: training exited with "
            "status 1: error: the sub-centre drop after epoch 1: excluding ") in report
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "subcenter-arcface-closed-0.2-seed0" in again.stdout
    assert "sface-closed-0.2-seed0" not in again.stdout.replace("subcenter-arcface-closed-0.2-seed0", "")
