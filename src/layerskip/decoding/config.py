"""One typed decoding configuration: what to decode and how, validated once.

`DecodeConfig` holds what a user asks for (every field optional where the model may store a default).
`DecodeConfig.resolve(model)` fills the model's stored defaults ("layerskip" in config.json: exit_layer,
num_speculations, confidence_threshold; the draft vocabulary from draft_vocab.json, see layerskip.draft_vocab),
checks the values against the model, and returns a `ResolvedConfig` with every value concrete. `generate`,
bench, sweep, replay, analyze and every CLI build their settings through it.

Rules: an invalid value is an error whatever the strategy (`top_p=1.5` fails also when greedy); a valid value
that the chosen strategy does not use gets one warning line (`LayerSkipWarning`), never silence.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

import torch

from layerskip import draft_vocab as draft_vocabulary
from layerskip.decoding.sampling import SamplingParams
from layerskip.errors import LayerSkipError

STRATEGIES = ("autoregressive", "early_exit", "self_speculative")
AUTO = "auto"  # exit_layer="auto": self-speculation chooses E and d while it decodes (decoding/auto.py)
DEFAULT_NUM_SPECULATIONS = 4


class LayerSkipWarning(UserWarning):
    """A valid option that has no effect in this configuration (printed as one line by the CLI)."""


def normalize_strategy(strategy: str) -> str:
    """"self-speculative" / "Self_Speculative" -> "self_speculative"; LayerSkipError for an unknown name."""
    name = str(strategy).replace("-", "_").lower()
    if name not in STRATEGIES:
        raise LayerSkipError(f"unknown strategy {strategy!r}; choose from "
                             f"{', '.join(s.replace('_', '-') for s in STRATEGIES)}")
    return name


def model_defaults(model) -> dict:
    """The decoding settings stored with a LayerSkip model: config.json's "layerskip" dict (may be empty)."""
    stored = getattr(model.config, "layerskip", None)
    return dict(stored) if isinstance(stored, dict) else {}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class DecodeConfig:
    """What to decode, as asked (None = the model's stored default, else the built-in one).

    Fields use the words of transformers and the paper's code: strategy ("autoregressive", "early_exit",
    "self_speculative"; dashes accepted), exit_layer E (1 <= E < L, or "auto": self-speculative decoding chooses
    E and d while it decodes, num_speculations then the longest draft; the default where the model stores no E),
    num_speculations d (>= 1),
    confidence_threshold C in [0, 1) (self-speculative adaptive draft length), draft_vocab (None: stored list or
    full; 0: full; N: the N most frequent stored ids; a tuple of ids), do_sample / temperature (> 0, finite) /
    top_k (>= 0, 0 = off) / top_p (in (0, 1]), seed, max_new_tokens (>= 0), stop_strings, eos_token_id
    (default: the model's generation config), compile (the static-shape path, decoding/static.py: torch.compile,
    and a CUDA graph per round on a GPU; greedy, a fixed exit layer, no confidence threshold).
    """

    strategy: str = "autoregressive"
    exit_layer: int | None = None
    num_speculations: int | None = None
    confidence_threshold: float | None = None
    draft_vocab: int | tuple[int, ...] | None = None
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    eos_token_id: tuple[int, ...] | None = None
    compile: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # frozen: normalise in place, once
        set_("strategy", normalize_strategy(self.strategy))
        if isinstance(self.stop_strings, str):
            set_("stop_strings", (self.stop_strings,))
        set_("stop_strings", tuple(s for s in (self.stop_strings or ()) if s))
        if any(not isinstance(s, str) for s in self.stop_strings):
            raise LayerSkipError("stop_strings must be strings")
        if self.eos_token_id is not None:
            ids = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else (self.eos_token_id,)
            if any(not _is_int(i) or i < 0 for i in ids):
                raise LayerSkipError(f"eos_token_id must be token ids >= 0, got {self.eos_token_id!r}")
            set_("eos_token_id", tuple(ids))
        if isinstance(self.draft_vocab, (list, torch.Tensor)):
            set_("draft_vocab", tuple(int(i) for i in (self.draft_vocab.tolist() if isinstance(
                self.draft_vocab, torch.Tensor) else self.draft_vocab)))
        self._check()

    def _check(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise LayerSkipError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.exit_layer == AUTO:
            if self.strategy == "early_exit":
                raise LayerSkipError(f"exit_layer 'auto' is for self-speculative decoding (the verifier keeps it "
                                     f"lossless); early exit needs a fixed exit layer")
        elif self.exit_layer is not None and (not _is_int(self.exit_layer) or self.exit_layer < 1):
            raise LayerSkipError(f"exit_layer must be an integer >= 1 or 'auto', got {self.exit_layer!r}")
        if self.num_speculations is not None and (not _is_int(self.num_speculations) or self.num_speculations < 1):
            raise LayerSkipError(f"num_speculations must be an integer >= 1, got {self.num_speculations!r}")
        c = self.confidence_threshold
        if c is not None and (not _is_number(c) or not 0 <= c < 1):
            raise LayerSkipError(f"confidence_threshold must be a number in [0, 1), got {c!r}")
        if self.temperature is not None and (not _is_number(self.temperature) or not math.isfinite(self.temperature)
                                             or self.temperature <= 0):
            raise LayerSkipError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise LayerSkipError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise LayerSkipError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise LayerSkipError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.compile, bool):
            raise LayerSkipError(f"compile must be True or False, got {self.compile!r}")
        v = self.draft_vocab
        if v is not None and not (_is_int(v) and v >= 0 or isinstance(v, tuple)):
            raise LayerSkipError(f"draft_vocab must be None, an integer >= 0 or a list of token ids, got {v!r}")
        if isinstance(v, tuple) and not v:
            raise LayerSkipError("draft_vocab is an empty list")
        if isinstance(v, tuple) and len(set(v)) != len(v):
            # a repeated id would score one token twice: the draft distribution, and so sampling, would be wrong
            raise LayerSkipError("draft_vocab holds repeated token ids; give each id once")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.do_sample, float(self.temperature or 1.0), self.top_k or None, self.top_p)

    def unused(self) -> list[str]:
        """The options given that this strategy / mode does not use (each gets a warning in `resolve`)."""
        s, out = self.strategy, []
        if s == "autoregressive" and self.exit_layer is not None:
            out.append("exit_layer (autoregressive decoding runs every layer)")
        if s != "self_speculative":
            for name in ("num_speculations", "confidence_threshold", "draft_vocab"):
                if getattr(self, name) is not None:
                    out.append(f"{name} (only self-speculative decoding drafts)")
        if not self.do_sample:
            for name in ("temperature", "top_k", "top_p", "seed"):
                if getattr(self, name) is not None:
                    out.append(f"{name} (greedy decoding; sampling is off)")
        return out

    def resolve(self, model, *, warn: bool = True) -> "ResolvedConfig":
        """Concrete settings for `model`: stored defaults filled in, values checked against the model."""
        if warn:
            for what in self.unused():
                warnings.warn(f"ignoring {what}", LayerSkipWarning, stacklevel=3)
        L = model.config.num_hidden_layers
        stored = model_defaults(model)
        exit_layer = num_speculations = threshold = vocab = None
        if self.strategy != "autoregressive":
            exit_layer = self.exit_layer if self.exit_layer is not None else stored.get("exit_layer") or (
                AUTO if self.strategy == "self_speculative" else max(1, L // 2))
            if exit_layer != AUTO and (not _is_int(exit_layer) or not 1 <= exit_layer < L):
                raise LayerSkipError(f"exit_layer must be an integer in [1, {L - 1}] for this {L}-layer model, "
                                     f"got {exit_layer!r}")
        if self.strategy == "self_speculative" and exit_layer == AUTO:
            num_speculations = self.num_speculations  # the longest draft auto may choose; None: its own cap
        elif self.strategy == "self_speculative":
            num_speculations = self.num_speculations or stored.get("num_speculations") or DEFAULT_NUM_SPECULATIONS
        if self.strategy == "self_speculative":
            threshold = self.confidence_threshold
            if threshold is None:
                threshold = stored.get("confidence_threshold") or 0.0
                if self.compile and threshold and warn:
                    warnings.warn(f"not using the model's stored confidence threshold {threshold}: compile=True "
                                  f"drafts {num_speculations} tokens every round", LayerSkipWarning, stacklevel=3)
                threshold = 0.0 if self.compile else threshold
            stored_vocab = getattr(model, "draft_vocab_ids", None)
            vocab = draft_vocabulary.resolve(stored_vocab, list(self.draft_vocab) if isinstance(
                self.draft_vocab, tuple) else self.draft_vocab, model.get_output_embeddings().weight.shape[0], "cpu")
            vocab = None if vocab is None else tuple(vocab.tolist())
        if self.compile:
            _check_compilable(self, exit_layer, threshold)
        eos = self.eos_token_id
        if eos is None:
            eos = tuple(eos_ids(model))
        return ResolvedConfig(strategy=self.strategy, exit_layer=exit_layer, num_speculations=num_speculations,
                              confidence_threshold=float(threshold) if threshold is not None else None,
                              draft_vocab=vocab, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                              seed=self.seed, stop_strings=self.stop_strings, eos_token_id=eos, compile=self.compile)

    def replace(self, **changes) -> "DecodeConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class ResolvedConfig:
    """Every setting concrete, for one model. exit_layer is None for autoregressive, "auto" where self-speculation
    chooses it (num_speculations then its cap, None = auto's own); num_speculations, confidence_threshold None
    unless self-speculative; draft_vocab None = the full vocabulary."""

    strategy: str
    exit_layer: int | str | None
    num_speculations: int | None
    confidence_threshold: float | None
    draft_vocab: tuple[int, ...] | None
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    eos_token_id: tuple[int, ...] = ()
    compile: bool = False

    def draft_vocab_tensor(self, device) -> torch.Tensor | None:
        return None if self.draft_vocab is None else torch.tensor(self.draft_vocab, dtype=torch.long, device=device)


def _check_compilable(cfg: DecodeConfig, exit_layer, threshold) -> None:
    """compile=True runs fixed-shape greedy rounds (decoding/static.py): name what it cannot do."""
    if cfg.do_sample:
        raise LayerSkipError("compile=True decodes greedily; sampling (do_sample) runs without --compile")
    if exit_layer == AUTO:
        raise LayerSkipError("compile=True needs a fixed exit layer (give exit_layer / --exit-layer E); "
                             "exit_layer 'auto' runs without --compile")
    if threshold:
        raise LayerSkipError("compile=True drafts a fixed number of tokens per round; the confidence threshold "
                             "(a data-dependent draft length) runs without --compile")


def eos_ids(model, tokenizer=None) -> list[int]:
    """The stop ids: the model's generation config's eos_token_id, else the tokenizer's, else none."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
