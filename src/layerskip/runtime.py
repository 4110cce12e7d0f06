"""Process-wide runtime settings, each set in one place: torch's CPU thread count and the device clock."""
from __future__ import annotations

import time

import torch

from layerskip.errors import LayerSkipError


def set_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads (`--threads`); None leaves torch's own choice."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LayerSkipError(f"--threads must be an integer >= 1, got {threads}")
    torch.set_num_threads(threads)


def clock(device: torch.device | str) -> float:
    """Seconds, honest on a GPU: waits for the device's queued work before reading the clock.

    Only for code that asked to be timed: on a GPU every call is a host-device synchronisation.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
