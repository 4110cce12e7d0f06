"""Layer dropout with a depth scale and a time schedule (LayerSkip, Elhoushi et al. 2024, section 4.1).

Terminology:
  L          number of decoder layers, indexed l = 0..L-1.
  t, T       the optimizer step (0-based) and the total number of steps.
  p(l, t)    the probability that layer l is skipped for one sample at step t:
                 p(l, t) = S(t) * D(l) * p_max
  D(l)       depth scale: "exponential" 2^(l/(L-1)) - 1 (the paper's; 0 at the first layer, 1 at the last),
             "linear" l/(L-1), or "uniform" 1.
  S(t)       time scale: "constant" 1 (continual pretraining, finetuning), "exponential" 2^(t/(T-1)) - 1
             (pretraining from scratch: no dropout at the start, p_max by the end), or "linear" t/(T-1).

A dropped row passes through the layer unchanged: x_{l+1} = x_l + M * f_l(x_l), M ~ Bernoulli(1 - p(l, t)),
drawn per sample. The layer runs on the kept rows only, so dropped rows cost no compute. There is no
1/(1-p) rescaling, as in the paper.

The masks come from a generator seeded by (seed, step, micro-batch, rank), not from the global RNG: they are
reproducible, so a resumed run draws the masks an uninterrupted run would have drawn.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

DEPTH_SCALES = ("exponential", "linear", "uniform")
TIME_SCALES = ("constant", "exponential", "linear")


def depth_scale(num_layers: int, kind: str = "exponential") -> list[float]:
    """D(l) for l = 0..L-1.

    Example:
        >>> depth_scale(3)  # 2^(l/2) - 1
        [0.0, 0.41421356237309515, 1.0]
    """
    if kind not in DEPTH_SCALES:
        raise ValueError(f"unknown depth scale {kind!r}; choose from {', '.join(DEPTH_SCALES)}")
    if kind == "uniform":
        return [1.0] * num_layers
    if num_layers == 1:
        return [0.0]
    frac = [l / (num_layers - 1) for l in range(num_layers)]
    if kind == "linear":
        return frac
    return [2.0**f - 1.0 for f in frac]


def time_scale(step: int, total_steps: int, kind: str = "constant") -> float:
    """S(t) at step t (0-based) of T steps; t beyond T-1 is clamped to T-1."""
    if kind not in TIME_SCALES:
        raise ValueError(f"unknown layer dropout schedule {kind!r}; choose from {', '.join(TIME_SCALES)}")
    if kind == "constant":
        return 1.0
    if total_steps <= 1:
        return 1.0
    frac = min(max(step, 0), total_steps - 1) / (total_steps - 1)
    return frac if kind == "linear" else 2.0**frac - 1.0


@dataclass(frozen=True)
class LayerDropout:
    """The rate schedule p(l, t) = S(t) * D(l) * p_max, and the per-sample masks drawn from it.

    Args:
        num_layers: L.
        p_max: the largest rate, in [0, 1).
        total_steps: T (used by the "exponential" and "linear" time scales).
        depth: "exponential" | "linear" | "uniform".
        schedule: "constant" | "exponential" | "linear".
        seed: mixed into every mask's generator seed.
    """

    num_layers: int
    p_max: float = 0.0
    total_steps: int = 1
    depth: str = "exponential"
    schedule: str = "constant"
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.p_max < 1.0:
            raise ValueError(f"layer dropout p_max must be in [0, 1), got {self.p_max}")
        depth_scale(1, self.depth), time_scale(0, 1, self.schedule)  # validate the names

    @property
    def enabled(self) -> bool:
        return self.p_max > 0.0

    def rates(self, step: int) -> list[float]:
        """[p(l, t) for l in 0..L-1] at step t (0-based)."""
        s = time_scale(step, self.total_steps, self.schedule)
        return [s * d * self.p_max for d in depth_scale(self.num_layers, self.depth)]

    def sample_keep(self, step: int, batch_size: int, micro_step: int = 0, rank: int = 0) -> torch.Tensor:
        """Which rows each layer runs on: bool (L, B), True = kept. On the CPU; deterministic in its arguments."""
        gen = torch.Generator().manual_seed(mask_seed(self.seed, step, micro_step, rank))
        u = torch.rand(self.num_layers, batch_size, generator=gen)  # (L, B)
        p = torch.tensor(self.rates(step), dtype=u.dtype)[:, None]  # (L, 1)
        return u >= p


def mask_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """A 63-bit seed from (seed, step, micro_step, rank), well mixed so nearby steps are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro_step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def run_on_rows(layer, hidden: torch.Tensor, keep: torch.Tensor, **layer_kwargs) -> torch.Tensor:
    """One decoder layer on the kept rows only; dropped rows pass through unchanged.

    Args:
        layer: a transformers decoder layer, `layer(hidden, attention_mask=..., position_ids=...,
            position_embeddings=(cos, sin)) -> hidden`.
        hidden: (B, T, H) the layer's input.
        keep: (B,) bool on the CPU, True = run the layer on that row.
        layer_kwargs: attention_mask ((B or 1, 1, T, T) or None), position_ids (1, T),
            position_embeddings ((1, T, D), (1, T, D)).
    Returns:
        (B, T, H) the layer's output for kept rows, the input for dropped rows.

    When every row on this process is dropped, the layer still runs on one token and adds 0 x its output: the
    layer's parameters stay in the autograd graph with a zero gradient. So under DDP every parameter gets a
    gradient on every rank, every step (no unused-parameter error with find_unused_parameters=False, no hang),
    and under FSDP every rank runs every layer's all-gather in lockstep, whatever its masks say. The cost is
    one token's compute.
    """
    batch = hidden.shape[0]
    kept = int(keep.sum())
    if kept == batch:
        return layer(hidden, **layer_kwargs)
    if kept == 0:
        stub = layer(hidden[:1, :1], **_first_token(layer_kwargs))  # (1, 1, H)
        return hidden + 0.0 * stub.sum()
    rows = keep.nonzero().squeeze(1).to(hidden.device, non_blocking=True)  # (k,)
    out = layer(hidden.index_select(0, rows), **_select_rows(layer_kwargs, rows, batch))  # (k, T, H)
    return hidden.index_copy(0, rows, out)  # (B, T, H)


def _select_rows(kwargs: dict, rows: torch.Tensor, batch: int) -> dict:
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] == batch and batch > 1:
        kwargs = {**kwargs, "attention_mask": mask.index_select(0, rows)}
    return kwargs


def _first_token(kwargs: dict) -> dict:
    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        out["attention_mask"] = mask[:1, ..., :1, :1]
    if kwargs.get("position_ids") is not None:
        out["position_ids"] = kwargs["position_ids"][:1, :1]
    if kwargs.get("position_embeddings") is not None:
        cos, sin = kwargs["position_embeddings"]
        out["position_embeddings"] = (cos[:1, :1], sin[:1, :1])
    return out
