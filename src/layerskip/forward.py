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
applies the final norm and LM head to any layer's output: `exit_logits`, the one definition of an exit's
logits, which decoding, the training loss, analysis and replay all use.

This module is the engine's leaf: it imports only the cache, the kernels and the architecture facts, never the
model resolver, decoding, training or evaluation. Few-row CPU matmul kernels and their tuning: kernels.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layerskip.architectures import check_supported, sliding_windows
from layerskip.cache import KVCache
from layerskip.kernels import (TUNE_ROWS, PackedWeights, check_kernel, linear, matmul, onednn_available, route,
                               version)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def exit_logits(h: torch.Tensor, norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None,
                mm=F.linear) -> torch.Tensor:
    """The logits of an exit: the model's final norm, then its LM head (`weight` (V, H), `bias` (V,) or None).

    h is any layer's output (..., H) -> (..., V). `mm(x, weight, bias)` is the matmul (default F.linear; the
    engine passes its few-row kernel, the training loss its own chunked one). LayerSkip §4.1: every exit shares
    the final norm and head, so an early exit is exactly this function applied to an earlier hidden state.
    """
    return mm(norm(h), weight, bias)


class LayerStack:
    """A supported transformers causal LM, runnable layer range by layer range.

    Args:
        model: a loaded supported transformers model (any dtype/device; weights are used in place).
        kernel: the few-row matmul kernel (kernels.KERNELS) for every row count, or None: on CPU "wxt" until
            `kernels.tune(stack)` times them on this model. The choice is one kernel per entry of TUNE_ROWS
            (`kernels`). Off CPU always "linear".
    """

    def __init__(self, model, kernel: str | None = None):
        if kernel is not None:
            check_kernel(kernel)
        check_supported(model)
        self.model = model
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
        self.windows = sliding_windows(cfg, self.num_layers)
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.vocab_size = cfg.vocab_size
        if self.device.type != "cpu" or kernel == "onednn" and not onednn_available():
            kernel = "linear"
        # the kernel for each bucket of row counts starting at TUNE_ROWS[i] (kernels.tune sets it)
        self.kernels: tuple[str, ...] = (kernel or "wxt",) * len(TUNE_ROWS)
        self.packed = PackedWeights()
        self._cos = self._sin = None
        self._sub = None  # (vocab ids, head weight version, head rows, bias rows) of the last draft vocabulary
        self.step_costs: dict = {}  # decoding/auto.py's measured pass costs, by draft vocabulary size
        self.static_decoders: dict = {}  # decoding/static.py's compiled decoders, by shape and settings
        self.auto_memory: dict = {}  # decoding/auto.py's acceptance estimates, carried from one generation to the next

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
        kernel = route(self.kernels, h.numel() // h.shape[-1])
        weight, bias = (self.lm_head.weight, self.lm_head.bias) if vocab is None else self._sub_head(vocab)
        return exit_logits(h, self.norm, weight, bias,
                           lambda x, w, b: matmul(x, w, b, kernel, self.packed))

    def run(self, h: torch.Tensor, start: int, end: int, cache: KVCache, pos, taps: dict | None = None,
            whole_cache: bool = False, lengths: list[int] | None = None) -> torch.Tensor:
        """Apply layers [start, end) to h (B, T, H) whose first token is at position `pos`.

        `pos` is an int (every row starts there: batch 1, or rows in lockstep) or a (B,) LongTensor of per-row
        start positions (batched decoding, where rows sit at different lengths: row b's tokens are at
        [pos[b], pos[b] + T), and its queries see its keys [0, own position] only).
        Writes K/V of these layers at those positions of `cache`; returns (B, T, H).
        taps: {e: list} for exit layers e in (start, end): the hidden state after the first e layers is appended
            to taps[e] (self-tuning measures other exits' drafts with them, decoding/auto.py).
        whole_cache: with a tensor `pos`, attend over the cache's whole length (keys past a row's position
            masked) instead of up to the furthest row's: every shape fixed and no host sync, for the static path
            (decoding/static.py).
        lengths: ragged rows, packed (with a tensor `pos`): h is (N, H), row b's lengths[b] tokens one after
            another (N = their sum; a row may have none), and so are the result and the taps. The norms, the
            projections and the MLP see only those N rows; attention sees them padded to (B, max(lengths)), the
            padding at the positions after each row's tokens, as in an unpacked pass (its K/V never visible).
            A batched verify pass of rows with different draft lengths then multiplies no padding.
        """
        if lengths is None:
            B, T = h.shape[:2]
            g, packing = route(self.kernels, B * T), None
        else:
            if isinstance(pos, int):
                raise ValueError("packed rows (lengths) need per-row positions (a (B,) tensor pos)")
            B, T = len(lengths), max(lengths)
            g, packing = route(self.kernels, h.shape[0]), (B, T, _packed_index(lengths, T, h.device))
        if isinstance(pos, int):
            cos, sin = self._cos[pos:pos + T], self._sin[pos:pos + T]  # (T, D)
            make_mask = lambda window: _attention_mask(pos, T, window, h.device)
            write = lambda i, k, v: cache.write(i, pos, k, v)  # (B, Hkv, pos + T, D)
        else:
            positions = pos[:, None] + torch.arange(T, device=pos.device)  # (B, T)
            cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # (B, 1, T, D)
            # keys [0, end_pos) cover every row's queries
            end_pos = cache.max_len if whole_cache else int(positions.max()) + 1
            make_mask = lambda window: _row_attention_mask(positions, end_pos, window)
            write = lambda i, k, v: cache.write_rows(i, positions, k, v, end_pos)  # (B, Hkv, end_pos, D)
        masks: dict[int | None, torch.Tensor | None] = {}
        for i in range(start, end):
            window = self.windows[i]
            if window not in masks:
                masks[window] = make_mask(window)
            layer = self.layers[i]
            h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), write, cos, sin, masks[window], g,
                                    packing)
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h), g)
            if taps and i + 1 in taps:
                taps[i + 1].append(h)
        return h

    # ---- internals -----------------------------------------------------------------------
    def _mlp(self, mlp, x, g):
        """The gated MLP of the Llama family: down(act(gate(x)) * up(x))."""
        p = self.packed
        return linear(mlp.act_fn(linear(x, mlp.gate_proj, g, p)) * linear(x, mlp.up_proj, g, p), mlp.down_proj, g, p)

    def _attention(self, i, attn, x, write, cos, sin, mask, g, packing=None):
        """Self-attention of layer i on x (B, T, H), or on packed rows x (N, H) with packing (B, T, index)."""
        D = self.head_dim
        q, k, v = (linear(x, proj, g, self.packed) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if packing is None:
            B, T, _ = x.shape
        else:  # the packed rows into their places in (B, T): attention and the cache are per row and position
            B, T, index = packing
            q, k, v = (t.new_zeros(B * T, t.shape[-1]).index_copy_(0, index, t) for t in (q, k, v))
        q, k = q.view(B, T, -1, D), k.view(B, T, -1, D)  # (B, T, Hq, D), (B, T, Hkv, D)
        v = v.view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:  # Qwen3: RMSNorm over the head dimension before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = write(i, k, v)  # (B, Hkv, S, D): every key a query of this pass may see
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=self.num_heads != self.num_kv_heads
        )  # (B, Hq, T, D)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, Hq D)
        if packing is not None:
            out = out.reshape(B * T, -1).index_select(0, packing[2])  # (N, Hq D)
        return linear(out, attn.o_proj, g, self.packed)

    def _sub_head(self, vocab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's rows for `vocab`, gathered once per vocabulary (contiguous, so a draft step
        streams len(vocab) rows instead of V)."""
        weight, bias = self.lm_head.weight, self.lm_head.bias
        old = self._sub
        if old is None or old[1] != version(weight) or not (old[0] is vocab or _same_ids(old[0], vocab)):
            self._sub = (vocab, version(weight), weight[vocab].contiguous(), None if bias is None else bias[vocab])
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


def _packed_index(lengths: list[int], T: int, device) -> torch.Tensor:
    """(N,) the place in a flattened (B, T) grid of each packed row's tokens: row b's j-th at b T + j."""
    return torch.tensor([b * T + j for b, n in enumerate(lengths) for j in range(n)], device=device)


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


def _row_attention_mask(positions: torch.Tensor, end: int, window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, end) mask for per-row query positions (B, T), True = visible: causal on each row's own
    positions, and within the sliding window if any. Keys past a row's own position (another row's longer
    context, or this row's stale drafts) are never visible."""
    q_pos = positions[:, None, :, None]  # (B, 1, T, 1)
    k_pos = torch.arange(end, device=positions.device)[None, None, None, :]  # (1, 1, 1, end)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask
