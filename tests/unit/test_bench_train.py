"""tools/bench_train.py runs end to end on CPU and its ratio columns follow from its samples/s column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALLEST = ["--device", "cpu", "--backbones", "tiny", "--batch", "4", "--classes", "16",
            "--warmup", "1", "--steps", "1", "--repeat", "1"]


def table_rows(stdout: str) -> dict[str, tuple[float, float, float]]:
    """variant -> (samples/s, x peer, x backbone), from the rows below the column header."""
    lines = [line.split() for line in stdout.splitlines()]
    start = next(i for i, words in enumerate(lines) if words[:2] == ["backbone", "variant"]) + 1
    rows = {}
    for words in lines[start:]:
        if len(words) == 6 and words[0] == "tiny":
            rows[words[1]] = (float(words[2]), float(words[3]), float(words[4]))
    return rows


def consistent(ratio: float, rate: float, reference: float) -> bool:
    """``ratio`` (printed to 0.01) is ``rate / reference`` (each printed to 0.1), within the rounding."""
    exact = rate / reference
    return abs(ratio - exact) <= 0.005 + exact * (0.05 / rate + 0.05 / reference) + 1e-9


def test_bench_train_prints_three_rows_with_consistent_ratios() -> None:
    result = subprocess.run(
        [sys.executable, "tools/bench_train.py", *SMALLEST], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = table_rows(result.stdout)
    assert sorted(rows) == ["backbone", "peer", "project"], result.stdout
    peer, alone = rows["peer"][0], rows["backbone"][0]
    for variant, (rate, x_peer, x_backbone) in rows.items():
        assert rate > 0, variant
        assert consistent(x_peer, rate, peer), (variant, result.stdout)
        assert consistent(x_backbone, rate, alone), (variant, result.stdout)
    assert rows["peer"][1] == 1.0 and rows["backbone"][2] == 1.0
