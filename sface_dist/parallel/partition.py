"""Partition arithmetic: which contiguous share of the classes (or images) each rank owns."""

from __future__ import annotations


def even_split(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` share of ``count`` items (classes, images) for ``rank``.

    Shares are in rank order and differ in size by at most one, the larger ones first.
    """
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def even_split_sizes(count: int, world_size: int) -> list[int]:
    """The size of every rank's ``even_split`` share, in rank order (the row counts for ``gather_rows``)."""
    return [stop - start for start, stop in (even_split(count, rank, world_size) for rank in range(world_size))]


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous ``[start, end)`` slice of the head's classes owned by ``rank`` (an ``even_split``)."""
    return even_split(num_classes, rank, world_size)

