"""A function mapped over chunks of items on worker processes, a few chunks in flight at a time, results in order.

The converter encodes images this way and ``inspect`` reads records this way, so memory stays flat on inputs
of any size.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

_CHUNK = 64
"""Items per task sent to a worker process."""

T = TypeVar("T")
R = TypeVar("R")


def map_chunks(
    function: Callable[..., list[R]], items: Sequence[T], extra: tuple[object, ...], workers: int | None
) -> Iterator[R]:
    """``function(chunk, *extra)`` over chunks of ``items`` on worker processes, results in order.

    A few chunks per worker are in flight at a time; ``workers=0`` runs in this process.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    chunks = [items[start : start + _CHUNK] for start in range(0, len(items), _CHUNK)]
    if workers == 0:
        for chunk in chunks:
            yield from function(chunk, *extra)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: collections.deque[Future[list[R]]] = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(function, chunk, *extra))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
