"""Training on one rank stops at a bad record with one line naming its file, key and offset, whatever the
number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from damaged_datasets import TrainingRun, assert_one_error_line, started_runs


@pytest.fixture(scope="module")
def bad_record_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TrainingRun]]:
    setups = {"1 rank, 0 workers": (0, 1), "1 rank, 2 workers": (2, 1)}
    with started_runs(tmp_path_factory, setups) as runs:
        yield runs


def test_training_stops_at_a_bad_record_with_one_line_for_any_worker_count(
    bad_record_runs: dict[str, TrainingRun],
) -> None:
    for name in ("1 rank, 0 workers", "1 rank, 2 workers"):
        run = bad_record_runs[name]
        _, stderr = run.process.communicate(timeout=240)
        assert run.process.returncode == 1, f"{name}: {stderr}"
        (key,) = run.bad_keys.values()
        assert_one_error_line(stderr, run.rec, key)
