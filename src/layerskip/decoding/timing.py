"""Wall-clock phase timing that is honest on GPUs (synchronises before reading the clock)."""
from __future__ import annotations

import time

import torch


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
