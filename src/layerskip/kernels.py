"""Matmul kernels for CPU decoding, and `tune`, which picks one per row count on this machine.

Decoding multiplies 1 to ~12 rows by weight matrices at batch 1, and tens to a few hundred in a batched verify
pass (B rows of k + 1 tokens). Which kernel is faster for that depends on the CPU, the
thread count and the matrices, by up to 2x either way: MKL's path for x @ W.T (a GEMV for one row, a GEMM that
repacks W for a few rows) can stream the weights at half the bandwidth of a GEMM computing W @ x.T, or be the
faster one for every row count; oneDNN's linear on a copy of the weight reordered for it once (`PackedWeights`)
can cost nearly the same for 2 rows as for 9 where MKL's cost doubles, and be the slowest for one row. So
`tune` times the kernels on the model itself, once, for each bucket of row counts (`TUNE_ROWS`). "wxt" is a
few-row trick: past `SMALL_GEMM_MAX_ROWS` rows it is F.linear. oneDNN on reordered weights stays ahead of MKL's
F.linear at every row count measured up to 136 (1.3x to 2x on a 2-core Zen 4, the LM head most of all), which is
why the buckets reach 64: a batched verify pass of 72 rows used to fall back to F.linear. Same arithmetic, another
kernel. Measurements are in docs/benchmarks.md.

Tuning is an explicit step: `tune(stack)` (or `layerskip.prepare(model, tune=True)`); an untuned stack on a CPU
uses "wxt" for every row count, and any other device "linear". The choice is `stack.kernels`; the decoding stats
and the bench JSON record it.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from layerskip.errors import LayerSkipError

KERNELS = ("linear", "wxt", "onednn")  # F.linear (x @ W.T); W @ x.T; oneDNN on reordered weights
SMALL_GEMM_MAX_ROWS = 12
# The row counts `tune` times: a one-token step, verify passes of a few tokens, and batched steps and verify
# passes. Row count r uses the choice made for the largest of these <= r.
TUNE_ROWS = (1, 2, 4, 8, 16, 32, 64)


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise LayerSkipError(f"unknown matmul kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    return kernel


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's CPU linear with reordered weights (the "onednn" kernel)."""
    ops = torch.ops.mkldnn
    try:
        return torch.backends.mkldnn.is_available() and bool(ops._linear_pointwise and ops._reorder_linear_weight)
    except (AttributeError, RuntimeError):
        return False


def route(kernels: tuple[str, ...], rows: int) -> str:
    """The kernel for a matmul over `rows` rows: the choice of the largest TUNE_ROWS bucket <= rows."""
    choice = kernels[0]
    for bucket, kernel in zip(TUNE_ROWS, kernels):
        if rows >= bucket:
            choice = kernel
    return choice


class PackedWeights:
    """Weights reordered for oneDNN's linear, made on first use and remade if the weight changes in place.

    One extra copy of each weight matrix that runs through the "onednn" kernel (float32 CPU weights only).
    """

    def __init__(self):
        self._packed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] != version(weight):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), SMALL_GEMM_MAX_ROWS)
            entry = self._packed[id(weight)] = (weight, version(weight), packed)
        return entry[2]

    def clear(self) -> None:
        self._packed.clear()


def linear(x: torch.Tensor, layer: nn.Module, kernel: str, packed: PackedWeights | None = None) -> torch.Tensor:
    """layer(x) for x (..., in); an nn.Linear with few rows goes through `kernel` (see `matmul`)."""
    if type(layer) is not nn.Linear:
        return layer(x)
    return matmul(x, layer.weight, layer.bias, kernel, packed)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str,
           packed: PackedWeights | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., in), weight (out, in), through `kernel` (KERNELS); "wxt" only for
    up to SMALL_GEMM_MAX_ROWS rows (F.linear past them).

    "onednn" needs `packed` (the reordered weights) and a float32 weight; otherwise it falls back to F.linear.
    """
    rows = x.numel() // x.shape[-1]
    if kernel == "linear" or kernel == "wxt" and rows > SMALL_GEMM_MAX_ROWS:
        return F.linear(x, weight, bias)
    if kernel == "onednn":
        if packed is None or weight.dtype != torch.float32 or weight.requires_grad and torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), packed(weight), bias, "none", [], "")
        return y.reshape(*x.shape[:-1], -1)
    x2 = x.reshape(rows, -1)  # (M, in)
    if rows == 1:
        x2 = torch.cat([x2, x2])  # a 2-column GEMM streams the weight faster than the GEMV
    # contiguous: left as the transposed view, everything downstream inherits a rows-innermost layout, which
    # sends the next W @ x.T down a 4x slower MKL path and CPU attention over several queries off its flash kernel
    y = (weight @ x2.T).T[:rows].contiguous()  # (M, out)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], -1)


def version(t: torch.Tensor) -> int:
    """t's in-place modification counter (inference tensors have none: they cannot change outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def candidates(stack) -> list[str]:
    """The kernels worth timing for this stack (oneDNN only where this torch has it, for float32 weights)."""
    if stack.device.type != "cpu":
        return ["linear"]
    return [k for k in KERNELS if k != "onednn" or onednn_available() and stack.dtype == torch.float32]


def tune(stack, reps: int = 3) -> tuple[str, ...]:
    """Choose the few-row matmul kernel of `stack` (a LayerStack) by timing each on its model, on this machine.

    For each row count in TUNE_ROWS, a pass through every layer and the head with each kernel (`candidates`),
    alternating, `reps` times after one warm-up round; the fastest minimum wins (past SMALL_GEMM_MAX_ROWS "wxt"
    is F.linear, so it is not timed there): about 17 (reps + 1) passes, a few seconds for a 135M model.
    Reordered weights are dropped afterwards (remade on use, for the layers that need them). Off CPU nothing is
    timed: "linear".

    Returns:
        the kernel for each bucket of row counts (TUNE_ROWS), also set as `stack.kernels`.
    """
    names = candidates(stack)
    if len(names) == 1:
        stack.kernels = (names[0],) * len(TUNE_ROWS)
        return stack.kernels
    choice = []
    with torch.inference_mode():
        for rows in TUNE_ROWS:
            h = stack.embed(torch.zeros(1, rows, dtype=torch.long, device=stack.device))
            cache = stack.new_cache(rows)
            timed = [k for k in names if k != "wxt" or rows <= SMALL_GEMM_MAX_ROWS]
            best = dict.fromkeys(timed, float("inf"))
            for rep in range(reps + 1):
                for kernel in timed:
                    stack.kernels = (kernel,) * len(TUNE_ROWS)
                    cache.crop(0)
                    t0 = time.perf_counter()
                    stack.logits(stack.run(h, 0, stack.num_layers, cache, 0))
                    if rep:  # round 0 warms up
                        best[kernel] = min(best[kernel], time.perf_counter() - t0)
            choice.append(min(timed, key=best.__getitem__))
    stack.kernels = tuple(choice)
    stack.packed.clear()
    return stack.kernels
