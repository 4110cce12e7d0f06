"""What `generate` returns: the new tokens, their text, and statistics about the run; the opt-in `Timer`; and
`ngram_repetition`, how much of a completion repeats itself."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from layerskip.runtime import clock


def ngram_repetition(ids: list[int], n: int = 4) -> float | None:
    """1 - distinct n-grams / n-grams of a completion's token ids: 0 where no n-gram repeats, near 1 for one loop.
    None if it has fewer than n tokens. (evaluation.metrics.repetition averages it over completions.)"""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else None


@dataclass
class GenerationStats:
    """Counts and timings of one generation.

    Words used (as in the paper and vLLM): per round the draft proposes `k` tokens ("drafted"); the
    longest prefix that the verifier agrees with is "accepted"; the verifier then adds one token of
    its own (the correction after a rejection, or the "bonus" token when all k were accepted). Only
    emitted drafts count as accepted: drafts after an EOS or a stop string, or past max_new_tokens, do not.

    total_s and first_token_s are always measured (no device synchronisation inside the loop: the tokens are
    read to the host anyway). The phase split (prefill_s, draft_s, verify_s) costs a synchronisation per phase
    on a GPU, so it is filled only when timing was asked for (`generate(..., timings=True)`).
    """

    strategy: str
    exit_layer: int | None = None
    num_speculations: int | None = None
    confidence_threshold: float | None = None  # self-speculative: adaptive draft length (0 = off)
    draft_vocab_size: int | None = None  # self-speculative: tokens the draft head scores (None = all)
    matmul_kernels: tuple[str, ...] | None = None  # the engine's few-row kernel per row bucket (kernels.py)
    num_prompt_tokens: int = 0
    num_new_tokens: int = 0
    stop_reason: str | None = None  # "eos" | "stop_string" | "length"
    total_s: float = 0.0
    first_token_s: float | None = None  # time until the first new token was known
    prefill_s: float | None = None  # timings=True, autoregressive / early exit: the prompt's forward pass
    draft_s: float | None = None  # timings=True, self-speculative: drafting (the prompt's early layers included)
    verify_s: float | None = None  # timings=True, self-speculative: verification (the prompt's late layers too)
    compile_s: float | None = None  # compile=True: compiling / capturing before decoding (0 when reused; not in total_s)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    exit_layer_per_round: list[int] = field(default_factory=list)  # self-speculative: E of every round
    speculations_per_round: list[int] = field(default_factory=list)  # self-speculative: d of every round (0: a step)

    def add_round(self, drafted: int, accepted: int, exit_layer: int | None = None,
                  num_speculations: int | None = None) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.accepted_per_round.append(accepted)
        if exit_layer is not None:
            self.exit_layer_per_round.append(exit_layer)
            self.speculations_per_round.append(num_speculations)

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts / drafted tokens; None when nothing was drafted (or the strategy does not draft)."""
        if self.strategy != "self_speculative" or not self.drafted:
            return None
        return self.accepted / self.drafted

    @property
    def tokens_per_round(self) -> float | None:
        return self.num_new_tokens / self.rounds if self.rounds and self.strategy == "self_speculative" else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_per_second=self.tokens_per_second, acceptance_rate=self.acceptance_rate,
                 tokens_per_round=self.tokens_per_round)
        return d


class Timer:
    """Phase timing for one generation, opt-in: `lap(name)` adds the time since the last lap to `stats.<name>`.

    Each lap synchronises the device (runtime.clock); the decode loops call it only when a Timer was given.
    """

    def __init__(self, device, stats: GenerationStats, names: tuple[str, ...]):
        self.device, self.stats = device, stats
        for name in names:
            setattr(stats, name, 0.0)
        self.last = clock(device)

    def lap(self, name: str) -> None:
        now = clock(self.device)
        setattr(self.stats, name, getattr(self.stats, name) + now - self.last)
        self.last = now


@dataclass
class GenerationResult:
    """`token_ids`: the new tokens only (ending with EOS when generation stopped on it).
    `text`: their decoded text when a tokenizer was given, cut before the first stop string."""

    token_ids: list[int]
    text: str | None
    stats: GenerationStats
