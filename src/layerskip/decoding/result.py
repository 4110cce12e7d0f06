"""What `generate` returns: the new tokens, their text, and statistics about the run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    """Counts and timings of one generation.

    Words used (as in the paper and vLLM): per round the draft proposes `k` tokens ("drafted"); the
    longest prefix that the verifier agrees with is "accepted"; the verifier then adds one token of
    its own (the correction after a rejection, or the "bonus" token when all k were accepted).
    """

    strategy: str
    exit_layer: int | None = None
    num_speculations: int | None = None
    confidence_threshold: float | None = None  # self-speculative: adaptive draft length (0 = off)
    draft_vocab_size: int | None = None  # self-speculative: tokens the draft head scores (None = all)
    num_prompt_tokens: int = 0
    num_new_tokens: int = 0
    stop_reason: str | None = None  # "eos" | "stop_string" | "length"
    total_s: float = 0.0
    first_token_s: float | None = None  # time until the first new token was known
    prefill_s: float | None = None  # autoregressive / early exit: the prompt's forward pass
    draft_s: float | None = None  # self-speculative: drafting (the prompt's early layers included)
    verify_s: float | None = None  # self-speculative: verification (the prompt's late layers included)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts / drafted tokens; None for strategies that do not draft."""
        if self.strategy != "self_speculative":
            return None
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float | None:
        return self.num_new_tokens / self.rounds if self.rounds and self.strategy == "self_speculative" else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_per_second=self.tokens_per_second, acceptance_rate=self.acceptance_rate,
                 tokens_per_round=self.tokens_per_round)
        return d


@dataclass
class GenerationResult:
    """`token_ids`: the new tokens only (ending with EOS when generation stopped on it).
    `text`: their decoded text when a tokenizer was given, cut before the first stop string."""

    token_ids: list[int]
    text: str | None
    stats: GenerationStats
