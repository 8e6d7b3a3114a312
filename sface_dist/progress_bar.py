"""A dependency-free progress bar for long work: conversions, scans, embedding extractions.

On a terminal the bar redraws one ``\\r`` line at most five times a second; in a log
file (not a TTY) it writes a plain line every 10% so that logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TextIO, TypeVar

T = TypeVar("T")


class ProgressBar:
    """Counts ``done`` out of ``total`` items; shows rate and ETA on ``stream`` (None: silent)."""

    def __init__(self, total: int, unit: str = "images", stream: TextIO | None = sys.stderr, done: int = 0) -> None:
        self.total = total
        self.unit = unit
        self.done = done
        self._stream = stream
        self._start_done = done
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = 10 * done // max(total, 1)
        self._tty = stream is not None and stream.isatty()

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._stream is None:
            return
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw >= 0.2:
                self._last_draw = now
                self._stream.write("\r" + self._line(now))
                self._stream.flush()
            return
        decile = 10 * self.done // max(self.total, 1)
        if decile > self._last_decile:
            self._last_decile = decile
            self._stream.write(self._line(now) + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._stream is not None and self._tty:
            self._stream.write("\r" + self._line(time.perf_counter()) + "\n")
            self._stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _line(self, now: float) -> str:
        rate = (self.done - self._start_done) / max(now - self._start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 30
        filled = width * self.done // max(self.total, 1)
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.unit}"
            f"  {rate:,.0f} {self.unit}/s  ETA {int(eta) // 60:d}:{int(eta) % 60:02d}"
        )


def with_progress(items: Iterable[T], total: int, enabled: bool, unit: str = "images") -> Iterator[T]:
    """``items``, counted on a progress bar on stderr when ``enabled``."""
    with ProgressBar(total, unit=unit, stream=sys.stderr if enabled else None) as bar:
        for item in items:
            yield item
            bar.update()
