"""When to stop: EOS ids, stop strings, and max_new_tokens, applied to the tokens a step emits.

`cut_at_stop` is the one place text is cut at a stop string (decoding, streaming, bench and metrics use it);
`TextStream` turns emitted tokens into text deltas that never show a stop string (the CLI's --stream, the server).
"""
from __future__ import annotations


def cut_at_stop(text: str, stop_strings) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings or () if s) if i >= 0), default=len(text))
    return text[:cut]


class StopChecker:
    """Decides, for the tokens one step (or round) proposes to emit, how many to keep and whether to stop.

    Stop rules, first hit wins: an EOS id (kept, as transformers does), the token that completes a
    stop string (kept in `token_ids`; the text is cut before the stop string), max_new_tokens.
    """

    def __init__(self, max_new_tokens: int, eos_token_ids=(), stop_strings=(), tokenizer=None):
        self.max_new_tokens = max_new_tokens
        self.eos = frozenset(eos_token_ids or ())
        self.stop_strings = tuple(s for s in (stop_strings or ()) if s)
        self.tokenizer = tokenizer

    def remaining(self, generated: list[int]) -> int:
        return self.max_new_tokens - len(generated)

    def drafts(self, generated: list[int], d: int) -> int:
        """How many of d drafts a round may make: a round emits its accepted drafts and the verifier's own token,
        so it drafts at most one fewer than the tokens left."""
        return min(d, self.remaining(generated) - 1)

    def accept(self, generated: list[int], new: list[int]) -> tuple[list[int], str | None]:
        """Returns (the prefix of `new` to emit, stop reason or None)."""
        keep, reason = [], None
        room = self.remaining(generated)
        for t in new[:room]:
            keep.append(t)
            if t in self.eos:
                reason = "eos"
                break
        if reason is None and len(keep) >= room:
            reason = "length"
        if self.stop_strings and keep and self._has_stop(generated + keep):
            for j in range(len(keep)):  # the earliest token that completes a stop string
                if self._has_stop(generated + keep[: j + 1]):
                    return keep[: j + 1], "stop_string"
        return keep, reason

    def _has_stop(self, ids: list[int]) -> bool:
        return has_stop(self.tokenizer, ids, self.stop_strings)

    def trim(self, text: str) -> str:
        """Cut text before the first stop string."""
        return cut_at_stop(text, self.stop_strings)


def has_stop(tokenizer, ids: list[int], stop_strings) -> bool:
    """Whether the decoded text of `ids` contains a stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in stop_strings)


class TextStream:
    """Streamed text: `feed(ids)` returns the new text that is safe to show, holding back what could still turn
    into a stop string (the last len(longest stop) - 1 characters) and an incomplete UTF-8 sequence;
    `finish(final_text)` returns the rest. The pieces add up to `final_text` (the result's `text`)."""

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in (stop_strings or ()) if s)
        self.ids: list[int] = []
        self.shown = 0

    def feed(self, ids: list[int]) -> str:
        self.ids += ids
        text = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        hold = max((len(s) for s in self.stops), default=1) - 1
        safe = (text[: len(text) - hold] if hold else text).rstrip("\ufffd")  # incomplete UTF-8: wait
        return self._take(safe)

    def finish(self, final_text: str) -> str:
        return self._take(final_text)

    def _take(self, text: str) -> str:
        if len(text) <= self.shown:
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new
