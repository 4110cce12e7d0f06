"""Process-wide runtime settings, each set in one place: torch's CPU thread count and the device clock; the
interleaved timing that the cost models share; and the CPU's name, which every benchmark report records."""
from __future__ import annotations

import os
import platform
import statistics
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


def cpu_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor @ 2.80GHz", from /proc/cpuinfo on Linux), else what
    `platform` knows ("x86_64"). Shared VMs of one name differ by CPU from one day to the next, and batched and
    served figures with them (docs/benchmarks.md): a report that names only the architecture cannot be compared."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """'<host> <CPU model>, <N> cpus': how the benchmarks' reports name the machine they ran on."""
    return f"{platform.node()} {cpu_name()}, {os.cpu_count()} cpus"


def clock(device: torch.device | str) -> float:
    """Seconds, honest on a GPU: waits for the device's queued work before reading the clock.

    Only for code that asked to be timed: on a GPU every call is a host-device synchronisation.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def interleaved_medians(pieces, repeats: int, warmup: int, device) -> dict:
    """{name: median seconds} of `pieces` [(name, fn, setup or None)] over `repeats` rounds after `warmup`, every
    piece once per round, in turn, so that a slow spell on a shared machine falls on all of them alike (their
    ratios are what predictions use). `setup()`, if given, runs untimed before each call of its piece."""
    times = {name: [] for name, _, _ in pieces}
    for i in range(warmup + repeats):
        for name, fn, setup in pieces:
            if setup is not None:
                setup()
            t0 = clock(device)
            fn()
            t1 = clock(device)
            if i >= warmup:
                times[name].append(t1 - t0)
    return {name: statistics.median(values) for name, values in times.items()}
