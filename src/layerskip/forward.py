"""The forward engine: run a transformers Llama-family model in pieces, with our one KV cache.

`LayerStack(model)` wraps a loaded LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM /
Qwen3ForCausalLM without copying weights. It calls the model's own modules (embedding, norms,
linear projections, MLPs, rotary embedding, LM head) and does the rest itself: the residual
stream, rotary application, the cache write and attention. That keeps it independent of
transformers' cache and mask classes (which change between releases) while every weight-bearing
computation stays the model's own. tests/test_forward.py checks it logit-for-logit against the
model's own forward for every supported architecture.

Terminology: the model has L decoder layers 0..L-1. `run(h, a, b, ...)` applies layers [a, b).
"Exit layer E" is the hidden state after the first E layers, i.e. `run(h, 0, E)`; `logits(h)`
applies the final norm and LM head to any layer's output.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from layerskip.cache import KVCache
from layerskip.models import check_supported


# Few-row matmuls on CPU. Decoding multiplies 1 to ~12 rows by weight matrices. Which kernel is faster
# for that depends on the CPU, the thread count and the matrices, by up to 2x either way: on one machine
# MKL's path for x @ W.T (a GEMV for one row, a GEMM that repacks W for a few rows) streamed 400 MB of
# weights at half the bandwidth of a GEMM computing W @ x.T (2 threads); on another (AVX2, 1 thread, a
# 47 MB model) x @ W.T was the faster one for every row count; on a third (AMD Zen 4, MKL, the built-in model,
# whose 47 MB of fp32 weights stream from memory each step) W @ x.T wins up to ~4 rows and x @ W.T from ~5.
# So `LayerStack.tune` times both on the model itself, once, for each bucket of row counts. Past ~12 rows
# the usual path wins everywhere. Same arithmetic, another kernel; see docs/benchmarks.md.
SMALL_GEMM_MAX_ROWS = 12
# The row counts `tune` times: a one-token step, and verify passes of a few tokens. Row count r uses the
# choice made for the largest of these <= r.
TUNE_ROWS = (1, 2, 4, 8)


def linear(x: torch.Tensor, layer: nn.Module, small_gemm: bool) -> torch.Tensor:
    """layer(x) for x (..., in); on CPU with few rows, through W @ x.T (see above)."""
    if type(layer) is not nn.Linear:
        return layer(x)
    return matmul(x, layer.weight, layer.bias, small_gemm)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, small_gemm: bool) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., in), weight (out, in); few rows on CPU through W @ x.T."""
    rows = x.numel() // x.shape[-1]
    if not small_gemm or rows > SMALL_GEMM_MAX_ROWS:
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, -1)  # (M, in)
    if rows == 1:
        x2 = torch.cat([x2, x2])  # a 2-column GEMM streams the weight faster than the GEMV
    # contiguous: left as the transposed view, everything downstream inherits a rows-innermost layout, which
    # sends the next W @ x.T down a 4x slower MKL path and CPU attention over several queries off its flash kernel
    y = (weight @ x2.T).T[:rows].contiguous()  # (M, out)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _sliding_windows(config, num_layers: int) -> list[int | None]:
    """Per-layer sliding window (None = full attention), following each architecture's config."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # Qwen2 / Qwen3 style: per-layer types
        return [window if t == "sliding_attention" else None for t in layer_types[:num_layers]]
    return [window] * num_layers  # Mistral style: one window for all layers (None = off)


class LayerStack:
    """A supported transformers causal LM, runnable layer range by layer range.

    Args:
        model: a loaded supported transformers model (any dtype/device; weights are used in place).
        small_gemm: route few-row matmuls through W @ x.T (see `matmul`): a bool for every row count, or
            None: yes on CPU until `tune` has timed both kernels on this model. The choice is kept as one
            bool per entry of TUNE_ROWS.
    """

    def __init__(self, model, small_gemm: bool | None = None):
        check_supported(model)
        cfg = model.config
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.rotary_emb = inner.rotary_emb
        self.num_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.scaling = attn.scaling
        self.qk_norm = hasattr(attn, "q_norm")
        self.windows = _sliding_windows(cfg, self.num_layers)
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.vocab_size = cfg.vocab_size
        on_cpu = self.device.type == "cpu"
        # for each bucket of row counts starting at TUNE_ROWS[i]: through W @ x.T?
        self.small_gemm = (on_cpu if small_gemm is None else small_gemm and on_cpu,) * len(TUNE_ROWS)
        self.tuned = small_gemm is not None or not on_cpu
        self._cos = self._sin = None
        self._sub = None  # (vocab ids, head weight version, head rows, bias rows) of the last draft vocabulary

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # ---- pieces --------------------------------------------------------------------------
    def new_cache(self, max_len: int, *, num_layers: int | None = None, batch: int = 1) -> KVCache:
        """A cache for the first `num_layers` layers (default all), room for `max_len` positions."""
        self._ensure_rope(max_len)
        return KVCache(num_layers or self.num_layers, batch, self.num_kv_heads, max_len, self.head_dim,
                       dtype=self.dtype, device=self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)  # (B, T) -> (B, T, H)

    def logits(self, h: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + LM head on any layer's output: (..., H) -> (..., V).

        With `vocab` (a 1-D LongTensor of token ids), only those rows of the head: (..., len(vocab)),
        column j scoring token vocab[j]. Drafting uses it to skip most of a large head.
        """
        g = self._route(h.numel() // h.shape[-1])
        if vocab is None:
            return linear(self.norm(h), self.lm_head, g)
        weight, bias = self._sub_head(vocab)
        return matmul(self.norm(h), weight, bias, g)

    def run(self, h: torch.Tensor, start: int, end: int, cache: KVCache, pos: int) -> torch.Tensor:
        """Apply layers [start, end) to h (B, T, H) whose first token is at position `pos`.

        Writes K/V of these layers at positions [pos, pos + T) of `cache`; returns (B, T, H).
        """
        B, T = h.shape[:2]
        g = self._route(B * T)
        cos = self._cos[pos:pos + T]  # (T, D)
        sin = self._sin[pos:pos + T]
        masks: dict[int | None, torch.Tensor | None] = {}
        for i in range(start, end):
            window = self.windows[i]
            if window not in masks:
                masks[window] = _attention_mask(pos, T, window, h.device)
            layer = self.layers[i]
            h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), cache, pos, cos, sin, masks[window], g)
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h), g)
        return h

    def tune(self, reps: int = 3) -> tuple[bool, ...]:
        """Choose the few-row matmul kernel (see `matmul`) by timing both on this model, on this machine.

        For each row count in TUNE_ROWS, a pass through every layer and the head with each kernel,
        alternating, `reps` times after one warm-up round; the faster minimum wins. CPU only, once per
        stack (later calls return the choice): 8 (reps + 1) passes, about two seconds for a 135M model.
        Returns `small_gemm`: for each bucket of row counts (TUNE_ROWS), through W @ x.T?
        """
        if self.tuned:
            return self.small_gemm
        choice = []
        with torch.no_grad():
            for rows in TUNE_ROWS:
                h = self.embed(torch.zeros(1, rows, dtype=torch.long, device=self.device))
                cache = self.new_cache(rows)
                best = {False: float("inf"), True: float("inf")}
                for rep in range(reps + 1):
                    for route in (False, True):
                        self.small_gemm = (route,) * len(TUNE_ROWS)
                        t0 = time.perf_counter()
                        self.logits(self.run(h, 0, self.num_layers, cache, 0))
                        if rep:  # round 0 warms up
                            best[route] = min(best[route], time.perf_counter() - t0)
                choice.append(best[True] < best[False])
        self.small_gemm, self.tuned = tuple(choice), True
        return self.small_gemm

    # ---- internals -----------------------------------------------------------------------
    def _route(self, rows: int) -> bool:
        """Whether a matmul over `rows` rows goes through W @ x.T (`matmul` itself skips it past SMALL_GEMM_MAX_ROWS)."""
        choice = self.small_gemm[0]
        for bucket, route in zip(TUNE_ROWS, self.small_gemm):
            if rows >= bucket:
                choice = route
        return choice

    def _mlp(self, mlp, x, g):
        """The gated MLP of the Llama family: down(act(gate(x)) * up(x))."""
        return linear(mlp.act_fn(linear(x, mlp.gate_proj, g)) * linear(x, mlp.up_proj, g), mlp.down_proj, g)

    def _attention(self, i, attn, x, cache, pos, cos, sin, mask, g):
        B, T, _ = x.shape
        D = self.head_dim
        q = linear(x, attn.q_proj, g).view(B, T, -1, D)  # (B, T, Hq, D)
        k = linear(x, attn.k_proj, g).view(B, T, -1, D)  # (B, T, Hkv, D)
        v = linear(x, attn.v_proj, g).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:  # Qwen3: RMSNorm over the head dimension before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = cache.write(i, pos, k, v)  # (B, Hkv, pos + T, D)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=self.num_heads != self.num_kv_heads
        )  # (B, Hq, T, D)
        return linear(out.transpose(1, 2).reshape(B, T, -1), attn.o_proj, g)

    def _sub_head(self, vocab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's rows for `vocab`, gathered once per vocabulary (contiguous, so a draft step
        streams len(vocab) rows instead of V)."""
        weight, bias = self.lm_head.weight, self.lm_head.bias
        old = self._sub
        if old is None or old[1] != _version(weight) or not (old[0] is vocab or _same_ids(old[0], vocab)):
            self._sub = (vocab, _version(weight), weight[vocab].contiguous(), None if bias is None else bias[vocab])
        return self._sub[2], self._sub[3]

    def _ensure_rope(self, max_len: int) -> None:
        """Precompute cos/sin for positions [0, max_len) with the model's own rotary embedding."""
        if self._cos is not None and self._cos.shape[0] >= max_len:
            return
        n = max(max_len, 256)
        positions = torch.arange(n, device=self.device)[None]  # (1, n)
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = self.rotary_emb(probe, positions)  # (1, n, D)
        self._cos, self._sin = cos[0], sin[0]


def _version(t: torch.Tensor) -> int:
    """t's in-place modification counter (inference tensors have none: they cannot change outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _same_ids(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def _attention_mask(pos: int, T: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (T, pos + T) mask, True = visible: causal, and within the sliding window if any.

    Returns None when every cached key is visible (a single query with no window in effect).
    """
    S = pos + T
    if T == 1 and (window is None or S <= window):
        return None
    q_pos = torch.arange(pos, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask
