"""The single KV cache shared by drafting and verification.

One preallocated key and value tensor per decoder layer, shape (B, H_kv, max_len, D), written at
explicit positions (gpt-fast style). The decode loop owns positions; layers never move them.

Validity. `valid[l]` is the number of leading positions whose K/V in layer l belong to the
accepted sequence. Entries past `valid[l]` are stale (rejected drafts) or unwritten. They are never
read: a query at position p attends to keys 0..p only, and every write starts at or before
`valid[l]`, so stale entries are overwritten before any query can see them.

After each step of a self-speculative round (x0 = last accepted token at position n, not cached):
  draft    layers 0..E-1 valid up to n + k (x0, d1..d_{k-1}; d_k is fed during verify)
  verify   every layer valid up to n + k + 1 (x0, d1..d_k)
  rollback `crop(n + 1 + a)`: every layer keeps x0 and the a accepted drafts, nothing after.
Rollback is free: it only lowers `valid`; no tensor is copied.
"""
from __future__ import annotations

import torch


class KVCache:
    """Preallocated K/V for `num_layers` layers (the first ones of the model).

    Args:
        num_layers: how many layers get a cache (L for full decoding, E for early exit).
        batch, num_kv_heads, head_dim: tensor shape (B, H_kv, ·, D).
        max_len: the most positions ever written (prompt + max_new_tokens).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = [0] * num_layers
        self.max_len = max_len

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) at positions [pos, pos + T) of `layer`.

        Returns the layer's keys and values for positions [0, pos + T) (views, no copy).
        """
        end = pos + k.shape[2]
        if pos > self.valid[layer] or end > self.max_len:
            raise RuntimeError(
                f"cache write at [{pos}, {end}) in layer {layer}: valid up to {self.valid[layer]}, size {self.max_len}"
            )
        self.keys[layer][:, :, pos:end] = k
        self.values[layer][:, :, pos:end] = v
        self.valid[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_rows(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched decoding: store row b's k, v (B, H_kv, T, D) at its own positions[b] (B, T) of `layer`.

        Rows sit at different lengths, so validity is per row and held by the decode loop (`lengths[b]`), not
        by `valid`: row b's positions [0, lengths[b]) hold its accepted sequence; what lies past them (another
        row's pass, rejected drafts, padding) is never visible to row b's queries (the attention mask is causal on
        each row's own positions) and is overwritten before it could be. Returns keys, values for [0, end).
        """
        if end > self.max_len:
            raise RuntimeError(f"cache write up to {end} in layer {layer}: size {self.max_len}")
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, H_kv, T, D)
        self.keys[layer].scatter_(2, index, k)
        self.values[layer].scatter_(2, index, v)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Batched decoding: keep only these batch rows (finished rows leave; copies every layer once)."""
        self.keys = [t.index_select(0, rows) for t in self.keys]
        self.values = [t.index_select(0, rows) for t in self.values]

    def append_rows(self, other: "KVCache") -> None:
        """Batched decoding: rows join (a server's new requests): other's rows go after these, in every layer.
        The shorter of the two is padded to the longer's max_len first. Copies every layer once."""
        if other.num_layers != self.num_layers:
            raise ValueError(f"append_rows: {other.num_layers} layers onto {self.num_layers}")
        size = max(self.max_len, other.max_len)
        pad = lambda t: t if t.shape[2] == size else torch.cat([t, t.new_zeros(*t.shape[:2], size - t.shape[2],
                                                                                t.shape[3])], 2)
        self.keys = [torch.cat([pad(a), pad(b)]) for a, b in zip(self.keys, other.keys)]
        self.values = [torch.cat([pad(a), pad(b)]) for a, b in zip(self.values, other.values)]
        self.max_len = size

    def crop(self, length: int) -> None:
        """Roll back: keep only positions [0, length) valid in every layer."""
        self.valid = [min(v, length) for v in self.valid]

    def snapshot(self) -> list[int]:
        """Each layer's valid length now, for `restore`."""
        return list(self.valid)

    def restore(self, valid: list[int]) -> None:
        """Set each layer's valid length back to a `snapshot`. Sound only while nothing before those lengths
        was overwritten since (the cost model times one piece of a round again and again from one state)."""
        if len(valid) != self.num_layers:
            raise ValueError(f"restore: {len(valid)} lengths for {self.num_layers} layers")
        self.valid = list(valid)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
