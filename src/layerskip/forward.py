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
from layerskip.errors import LayerSkipError
from layerskip.models import check_supported


# Few-row matmuls on CPU. Decoding multiplies 1 to ~12 rows by weight matrices. Which kernel is faster
# for that depends on the CPU, the thread count and the matrices, by up to 2x either way: on one machine
# MKL's path for x @ W.T (a GEMV for one row, a GEMM that repacks W for a few rows) streamed 400 MB of
# weights at half the bandwidth of a GEMM computing W @ x.T (2 threads); on another (AVX2, 1 thread, a
# 47 MB model) x @ W.T was the faster one for every row count; on a third (AMD Zen 4, MKL, the built-in model,
# whose 47 MB of fp32 weights stream from memory each step) W @ x.T wins up to ~4 rows and x @ W.T from ~5.
# A third kernel, oneDNN's linear on a copy of the weight reordered for it once (`PackedWeights`), costs
# nearly the same for 2 rows as for 9 on that Zen 4, where MKL's cost doubles; for one row it is the slowest.
# So `LayerStack.tune` times the kernels on the model itself, once, for each bucket of row counts. Past ~12
# rows the usual path wins everywhere. Same arithmetic, another kernel; see docs/benchmarks.md.
KERNELS = ("linear", "wxt", "onednn")  # F.linear (x @ W.T); W @ x.T; oneDNN on reordered weights
SMALL_GEMM_MAX_ROWS = 12
# The row counts `tune` times: a one-token step, and verify passes of a few tokens. Row count r uses the
# choice made for the largest of these <= r.
TUNE_ROWS = (1, 2, 4, 8)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's CPU linear with reordered weights (the "onednn" kernel)."""
    ops = torch.ops.mkldnn
    try:
        return torch.backends.mkldnn.is_available() and bool(ops._linear_pointwise and ops._reorder_linear_weight)
    except (AttributeError, RuntimeError):
        return False


class PackedWeights:
    """Weights reordered for oneDNN's linear, made on first use and remade if the weight changes in place.

    One extra copy of each weight matrix that runs through the "onednn" kernel (float32 CPU weights only).
    """

    def __init__(self):
        self._packed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] != _version(weight):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), SMALL_GEMM_MAX_ROWS)
            entry = self._packed[id(weight)] = (weight, _version(weight), packed)
        return entry[2]

    def clear(self) -> None:
        self._packed.clear()


def linear(x: torch.Tensor, layer: nn.Module, kernel: str, packed: PackedWeights | None = None) -> torch.Tensor:
    """layer(x) for x (..., in); an nn.Linear on CPU with few rows through `kernel` (see above)."""
    if type(layer) is not nn.Linear:
        return layer(x)
    return matmul(x, layer.weight, layer.bias, kernel, packed)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str,
           packed: PackedWeights | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., in), weight (out, in), through `kernel` (KERNELS) for few rows.

    "onednn" needs `packed` (the reordered weights) and a float32 weight; otherwise it falls back to F.linear.
    """
    rows = x.numel() // x.shape[-1]
    if kernel == "linear" or rows > SMALL_GEMM_MAX_ROWS:
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
        kernel: the few-row matmul kernel (KERNELS, see `matmul`) for every row count, or None: on CPU,
            "wxt" until `tune` has timed the kernels on this model. The choice is kept as one kernel per
            entry of TUNE_ROWS (`kernels`). Off CPU always "linear".
    """

    def __init__(self, model, kernel: str | None = None):
        if kernel is not None and kernel not in KERNELS:
            raise LayerSkipError(f"unknown matmul kernel {kernel!r}; choose from {', '.join(KERNELS)}")
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
        if not on_cpu or kernel == "onednn" and not onednn_available():
            kernel = "linear"
        # the kernel for each bucket of row counts starting at TUNE_ROWS[i]
        self.kernels = (kernel or "wxt",) * len(TUNE_ROWS)
        self.tuned = kernel is not None
        self.packed = PackedWeights()
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
            return linear(self.norm(h), self.lm_head, g, self.packed)
        weight, bias = self._sub_head(vocab)
        return matmul(self.norm(h), weight, bias, g, self.packed)

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

    def tune(self, reps: int = 3) -> tuple[str, ...]:
        """Choose the few-row matmul kernel (see `matmul`) by timing each on this model, on this machine.

        For each row count in TUNE_ROWS, a pass through every layer and the head with each kernel (KERNELS,
        "onednn" where available), alternating, `reps` times after one warm-up round; the fastest minimum wins.
        CPU only, once per stack (later calls return the choice): 12 (reps + 1) passes, a few seconds for a
        135M model. Reordered weights are dropped afterwards (remade on use, for the layers that need them).
        Returns `kernels`: the kernel for each bucket of row counts (TUNE_ROWS).
        """
        if self.tuned:
            return self.kernels
        candidates = [k for k in KERNELS if k != "onednn" or onednn_available() and self.dtype == torch.float32]
        choice = []
        with torch.no_grad():
            for rows in TUNE_ROWS:
                h = self.embed(torch.zeros(1, rows, dtype=torch.long, device=self.device))
                cache = self.new_cache(rows)
                best = dict.fromkeys(candidates, float("inf"))
                for rep in range(reps + 1):
                    for kernel in candidates:
                        self.kernels = (kernel,) * len(TUNE_ROWS)
                        t0 = time.perf_counter()
                        self.logits(self.run(h, 0, self.num_layers, cache, 0))
                        if rep:  # round 0 warms up
                            best[kernel] = min(best[kernel], time.perf_counter() - t0)
                choice.append(min(candidates, key=best.__getitem__))
        self.kernels, self.tuned = tuple(choice), True
        self.packed.clear()
        return self.kernels

    # ---- internals -----------------------------------------------------------------------
    def _route(self, rows: int) -> str:
        """The kernel for a matmul over `rows` rows (`matmul` itself takes F.linear past SMALL_GEMM_MAX_ROWS)."""
        choice = self.kernels[0]
        for bucket, kernel in zip(TUNE_ROWS, self.kernels):
            if rows >= bucket:
                choice = kernel
        return choice

    def _mlp(self, mlp, x, g):
        """The gated MLP of the Llama family: down(act(gate(x)) * up(x))."""
        p = self.packed
        return linear(mlp.act_fn(linear(x, mlp.gate_proj, g, p)) * linear(x, mlp.up_proj, g, p), mlp.down_proj, g, p)

    def _attention(self, i, attn, x, cache, pos, cos, sin, mask, g):
        B, T, _ = x.shape
        D = self.head_dim
        q = linear(x, attn.q_proj, g, self.packed).view(B, T, -1, D)  # (B, T, Hq, D)
        k = linear(x, attn.k_proj, g, self.packed).view(B, T, -1, D)  # (B, T, Hkv, D)
        v = linear(x, attn.v_proj, g, self.packed).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:  # Qwen3: RMSNorm over the head dimension before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = cache.write(i, pos, k, v)  # (B, Hkv, pos + T, D)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=self.num_heads != self.num_kv_heads
        )  # (B, Hq, T, D)
        return linear(out.transpose(1, 2).reshape(B, T, -1), attn.o_proj, g, self.packed)

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
