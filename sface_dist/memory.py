"""How much memory is available, so that a size read from a file or a config is checked before it is allocated."""

from __future__ import annotations

import os

import torch


def available_host_memory() -> int | None:
    """Bytes of memory available now: Linux's MemAvailable, else free pages; None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name (macOS)
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: the GPU's free memory, or the host's for the CPU; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_memory()
