"""Host-side agreement between ranks: every rank takes the same branch after a local failure or a stop request,
and a collective that never completes becomes one line naming what waited and for whom."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from sface_dist.parallel.collectives import group_rank, group_size


class PeerError(RuntimeError):
    """Another rank stopped with an error and reported it; this rank stops too, silently."""


class CollectiveError(RuntimeError):
    """A collective that never completed on this rank: a peer hung past the timeout, or died."""


def control_group(timeout_minutes: float | None = None) -> ProcessGroup | None:
    """Collective: a gloo group for small host-side decisions, so that they never wait on a GPU stream.

    None (the default group) when the default group is gloo already or there is none. ``timeout_minutes``: how
    long a decision waits for a peer (None: gloo's default).
    """
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
    return dist.new_group(backend="gloo", timeout=timeout)


def _control_device(group: ProcessGroup | None) -> torch.device:
    """Where small control tensors live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _max_over_ranks(values: list[int], group: ProcessGroup | None) -> list[int]:
    """Collective: the element-wise maximum of small integers over the ranks (one all-reduce)."""
    if group_size(group) == 1:
        return values
    flags = torch.tensor(values, dtype=torch.int32, device=_control_device(group))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags.tolist()


def all_ranks_ok(ok: bool, group: ProcessGroup | None = None) -> bool:
    """Collective: whether ``ok`` holds on every rank, so that all ranks take the same branch after a local failure."""
    return _max_over_ranks([0 if ok else 1], group)[0] == 0


def raise_on_any_rank(error: BaseException | None, group: ProcessGroup | None = None, stop: int = 0) -> int:
    """Collective: re-raise ``error`` on the rank that hit it, and ``PeerError`` on the others.

    The rank that failed prints its one line; the others stop without adding their own. ``stop`` (a signal
    number, 0 for none) rides on the same all-reduce: returns its maximum over the ranks, so that every rank
    learns that some rank was asked to stop.
    """
    failed, stop = _max_over_ranks([0 if error is None else 1, stop], group)
    if not failed:
        return stop
    if error is not None:
        raise error
    raise PeerError("another rank stopped with an error")


_TIMED_OUT = re.compile(r"Timed out waiting (\d+)ms")


_PEER_CLOSED = re.compile(r"Connection (?:closed|reset) by peer(?: \[([^\]]+)\])?")


@contextlib.contextmanager
def naming_collective_failures(what: str, rank: int, world_size: int, hint: str = "") -> Iterator[None]:
    """Turn gloo's error for a collective that never completed into a ``CollectiveError`` of one line naming
    ``what`` was waiting, this rank, and the peer when there is only one: a peer that hung past the timeout
    ("Timed out waiting Nms") or died ("Connection closed by peer [host]"). Other errors pass through, and so
    does a ``CollectiveError`` named by an inner block. ``hint`` ends the line (the setting to change, say)."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:
        peer = f"rank {1 - rank}" if world_size == 2 else f"one of the other {world_size - 1} ranks"
        hint = f"; {hint}" if hint else ""
        if timed_out := _TIMED_OUT.search(str(error)):
            minutes = int(timed_out[1]) / 60000
            raise CollectiveError(
                f"rank {rank}: {what} timed out after {minutes:.3g} min waiting for {peer} "
                f"(a peer hung or died{hint})"
            ) from error
        if closed := _PEER_CLOSED.search(str(error)):
            host = f" on {closed[1]}" if closed[1] else ""
            raise CollectiveError(
                f"rank {rank}: {what} failed: {peer}{host} closed its connection (it stopped or died: "
                f"see its log{hint})"
            ) from error
        raise


def broadcast_message(message: str | None, group: ProcessGroup | None = None) -> str | None:
    """Collective: rank 0's ``message`` on every rank (a decision only rank 0 can take, such as a lock)."""
    if group_size(group) == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group, device=_control_device(group))
    return box[0]


def all_gather_objects(value: Any, group: ProcessGroup | None = None) -> list[Any]:
    """Collective: every rank's picklable ``value``, in rank order (small host-side records)."""
    if group_size(group) == 1:
        return [value]
    values: list[Any] = [None] * group_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


@dataclass(frozen=True)
class RankFailure:
    """A local check that failed on some ranks: the lowest such rank and the cause it found."""

    rank: int
    cause: str
    where: str
    """`` on rank N`` when several ranks ran the check, else empty: for the one line that reports it."""

    def raise_here(self, error: BaseException, summary: str, group: ProcessGroup | None = None) -> NoReturn:
        """Stop every rank: the failing one with ``error``, the others with a ``PeerError`` of ``summary`` naming
        that rank."""
        if group_rank(group) != self.rank:
            raise PeerError(f"rank {self.rank}: {summary}")
        raise error


def first_failure(cause: str | None, group: ProcessGroup | None = None) -> RankFailure | None:
    """Collective: the lowest rank whose local check found a ``cause`` (None: no rank did).

    Every rank takes the same branch after it, and one of them can say why.
    """
    causes = all_gather_objects(cause, group)
    rank = next((rank for rank, text in enumerate(causes) if text is not None), None)
    if rank is None:
        return None
    return RankFailure(rank, causes[rank], f" on rank {rank}" if len(causes) > 1 else "")

