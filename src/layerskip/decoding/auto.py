"""Self-tuning self-speculation (`exit_layer="auto"`): the exit layer E and the draft length d chosen while decoding.

Terminology as in self_speculative.py. Two things decide which (E, d) is fastest, and both are measured here:
  costs       what a pass costs on this machine: one layer, the head (full, and over the draft vocabulary) and a
              pass's fixed overhead, at each row count (`StepCosts`, timed once per engine and draft vocabulary
              and kept on the engine). A round of k drafts for B rows at E costs
                (k + 1) early passes of B rows through [0, E), k draft heads of B rows,
                one late pass of B(k + 1) rows through [E, L) and the full head on B(k + 1) rows;
              an autoregressive step one pass of B rows through [0, L) and the head.
  acceptance  how often a draft from each candidate layer would be accepted, by depth (`RunStats`: the chance
              that draft j is accepted given drafts 1 .. j - 1 were; in code drafts come in bursts, which an
              i.i.d. rate misses). The current E's comes from its own rounds. Every PROBE_EVERY rounds a round is
              a probe ("shadow tokens", DEL, COLM 2025): the hidden states the round computes anyway at other
              candidate layers (below E while drafting, above E while verifying) go through the (draft) head, and
              their argmax at each position whose context the verifier confirmed (x0 and the accepted drafts) is
              compared with the verifier's own. Estimates are exponentially weighted, so they follow the text.
  speed       each round's wall time: layers are compared by measured tokens per second where one was measured
              lately (the current layer, or one tried before); the others by the cost model's prediction, scaled
              by the current layer's measured / predicted (probed positions are easy ones, which flatter shadows).
  memory      a plan shares its acceptance estimates with the engine (`stack.auto_memory`, by draft vocabulary,
              threshold and cap): the next generation on the same engine starts at the model's stored E (else at
              the exit layer the last one chose), after one warm-up round, its estimates going on from the old
              ones as priors (CARRIED runs each at most).
`AutoPlan.choose` takes the k of the most predicted tokens per second at the current E, or an autoregressive step
where no round beats it (a batch of many rows on a CPU, or acceptance that has collapsed), and switches E only for
a clear gain (SWITCH_GAIN); a layer switched to on a prediction is kept until its own speed is measured
(HOLD_ROUNDS at most), and the layer it goes back to, if that trial lost, is kept HOLD_ROUNDS. What a layer
measured of itself (its speed, its own rounds' rates) speaks for it for FRESH_FOR rounds after its last: text
changes along a generation. The model's stored E is left only past a generation's first FRESH_FOR rounds, once
measured, and is tried again once the layer it was left for is measured and its own speed is stale (probes cannot
see that a deeper layer's runs are longer). After a round that reached its cap, a probe round drafts past the
chosen k (PROBE_DEPTH), so a depth once seen failing is seen again.
At batch 1, while the model's stored E pays (its best round, from its own rounds' acceptance, predicted at least
KEEP_PAYING times as fast as an autoregressive step), the stored E and d run as they are, with no probe and no
choice (`_quiet`): on the built-in model the stored cell is the best static cell within noise, and the probing and
choosing there cost up to 3% of a decode for nothing measurable. Where the stored E stops paying, choosing and probing
start at once.
Lossless whatever it chooses: the verifier alone decides what is emitted, every layer's cache is valid up to the
accepted length after every round, so E may change between rounds, and sampling stays distribution-exact (each
choice depends only on what earlier rounds verified).
"""
from __future__ import annotations

import collections
import functools
import statistics
from dataclasses import dataclass, field

import torch

from layerskip.decoding.config import AUTO, model_defaults
from layerskip.forward import LayerStack
from layerskip.runtime import interleaved_medians

MAX_SPECULATIONS = 12  # the longest draft auto chooses when no num_speculations caps it
PROBE_EVERY = 8  # a probe round every this many rounds, after the first WARMUP_ROUNDS (all probes)
PROBE_DEPTH = 2  # a probe round after a capped round drafts up to this many times the chosen k, plus 2
WARMUP_ROUNDS = 3
DECAY = 0.98  # per observed token: estimates weigh the last ~1 / (1 - DECAY) tokens
SWITCH_GAIN = 1.10  # change E only when another E's best round is predicted this much faster
MEASURED_GAIN = 1.0  # ... or when another E was measured this much faster lately
SPEED_DECAY = 0.8  # per round: measured speeds weigh the last ~5 rounds
AR = 0  # the key of autoregressive steps among measured speeds
STEP_WITHIN = 1.3  # try steps (to measure them) where the cost model puts them within 30% of the measured round
MEASURED_ROUNDS, MEASURED_FOR = 4, 64  # a measured speed counts after 4 rounds at it, for 64 rounds after the last
FRESH_FOR = 16  # what a layer measured of itself (speed, own rates) speaks for it this many rounds after its last
HOLD_ROUNDS = 2 * MEASURED_ROUNDS  # a layer chosen on a prediction is kept until measured, for at most this many
REAL_ENOUGH = 8.0  # rounds (weighted) of a layer's own after which its own outcomes replace its shadow estimate
SHADOW_ENOUGH = 6.0  # probed positions (weighted) a layer needs before a switch to it may rest on its shadows
CARRIED = 4.0  # a new generation's carried estimates count as at most this many runs each: priors, not evidence
KEEP_PAYING = 1.0  # batch 1: the stored settings run as they are while the stored E's best round is predicted at least
# this many times as fast as an autoregressive step (AutoPlan._quiet)
PRICE_EVERY = 4  # the current layer's best round is priced again after this many rounds (at once after a capped one)
_COST_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def candidate_layers(num_layers: int, most: int = 12) -> tuple[int, ...]:
    """The exit layers auto considers: every E in [1, L) for small models, else `most` spread over [1, L)."""
    if num_layers - 1 <= most:
        return tuple(range(1, num_layers))
    return tuple(sorted({round(1 + i * (num_layers - 2) / (most - 1)) for i in range(most)}))


@dataclass
class StepCosts:
    """Seconds per pass piece at each row count in `rows` (medians): one decoder layer, the full head, the draft
    head, and a pass's fixed overhead (embedding, masks, Python). Linear between measured row counts."""

    rows: tuple[int, ...]
    layer: tuple[float, ...]
    head: tuple[float, ...]
    draft_head: tuple[float, ...]
    fixed: float

    def _at(self, table: tuple[float, ...], r: float) -> float:
        rows = self.rows
        if r <= rows[0]:
            return table[0]
        for i in range(1, len(rows)):
            if r <= rows[i] or i == len(rows) - 1:
                lo, hi = rows[i - 1], rows[i]
                return table[i - 1] + (r - lo) * (table[i] - table[i - 1]) / (hi - lo)
        return table[-1]

    @functools.cached_property
    def by_row(self) -> tuple[list[float], list[float]]:
        """(layer, head) costs at 0, 1, .., rows[-1] + 1 rows: the hot loop of best_round interpolates between
        whole row counts inline instead of calling at_layer / at_head."""
        span = range(int(self.rows[-1]) + 2)
        return [self._at(self.layer, r) for r in span], [self._at(self.head, r) for r in span]

    def at_layer(self, r: float) -> float:
        return self._at(self.layer, r)

    def at_head(self, r: float) -> float:
        return self._at(self.head, r)

    def at_draft_head(self, r: float) -> float:
        return self._at(self.draft_head, r)

    def autoregressive(self, num_layers: int, B: int) -> float:
        return self.fixed + num_layers * self.at_layer(B) + self.at_head(B)


def measure_step_costs(stack: LayerStack, vocab: torch.Tensor | None, max_rows: int, *, context: int = 64,
                       repeats: int = 5) -> StepCosts:
    """Time one layer, the heads and a pass's overhead at every row count of _COST_ROWS up to max_rows (at least
    the next one above it), each piece in turn within a repetition, over a cache of `context` positions."""
    L, H = stack.num_layers, stack.model.config.hidden_size
    rows = tuple(r for r in _COST_ROWS if r < max_rows) + (next((r for r in _COST_ROWS if r >= max_rows), max_rows),)
    gen = torch.Generator().manual_seed(0)
    cache = stack.new_cache(context + rows[-1])
    h0 = torch.randn(1, context, H, generator=gen).to(stack.device, stack.dtype)
    layer, head, draft_head, fixed = [], [], [], []
    with torch.inference_mode():
        stack.run(h0, 0, L, cache, 0)
        for r in rows:
            h = torch.randn(1, r, H, generator=gen).to(stack.device, stack.dtype)
            t = interleaved_medians([("one", lambda: stack.run(h, 0, 1, cache, context), None),
                                     ("all", lambda: stack.run(h, 0, L, cache, context), None),
                                     ("head", lambda: stack.logits(h[0]).argmax(-1), None),
                                     ("draft", lambda: stack.logits(h[0], vocab).argmax(-1), None)],
                                    repeats, 1, stack.device)
            per_layer = max(t["all"] - t["one"], 0.0) / (L - 1)
            layer.append(per_layer)
            fixed.append(max(t["one"] - per_layer, 0.0))
            head.append(t["head"])
            draft_head.append(t["draft"])
    return StepCosts(rows, tuple(layer), tuple(head), tuple(draft_head), statistics.median(fixed))


def step_costs(stack: LayerStack, vocab: torch.Tensor | None, max_rows: int) -> StepCosts:
    """The engine's measured costs for this draft vocabulary, covering max_rows (timed on first use, then kept
    in `stack.step_costs`, like the engine's tuned kernels)."""
    key = None if vocab is None else int(vocab.numel())
    costs = stack.step_costs.get(key)
    if costs is None or costs.rows[-1] < max_rows:
        costs = stack.step_costs[key] = measure_step_costs(stack, vocab, max_rows)
    return costs


class RunStats:
    """Survival statistics of runs in boolean sequences, by depth: at depth j (1-based), how often a run that has
    lasted j - 1 steps lasts one more (the hazard's complement), exponentially weighted (DECAY per observation).

    Drafts are not i.i.d.: in easy text an exit agrees for long stretches, in hard text it fails at once, so the
    chance that draft j is accepted given that drafts 1 .. j - 1 were rises with j. Counting by depth keeps that.
    The decay is lazy: the counts are kept in units of `_unit` (the weight of the first observation relative to
    the newest), so an observation scales one number, not every depth's counts.
    """

    def __init__(self, depth: int):
        self._success = [0.0] * depth  # counts / _unit
        self._trials = [0.0] * depth
        self._unit = 1.0
        self._rates: list[float] | None = None  # rates() until the next add or shrink

    @property
    def success(self) -> list[float]:
        return [x * self._unit for x in self._success]

    @property
    def trials(self) -> list[float]:
        return [x * self._unit for x in self._trials]

    def runs(self) -> float:
        """The (weighted) runs counted at depth 1."""
        return self._trials[0] * self._unit

    def add(self, seq, starts: bool = False) -> None:
        """One sequence of outcomes; runs start at its first element (a round), or at every element (a probe's
        confirmed positions: a round could have started at any of them). The end of `seq` censors runs."""
        if not seq:
            return
        w, success, trials = self._weight(len(seq)), self._success, self._trials
        D = len(trials)
        for i in range(len(seq) if starts else 1):
            for j, ok in enumerate(seq[i:i + D]):
                trials[j] += w
                if not ok:
                    break
                success[j] += w

    def _weight(self, observations: int) -> float:
        """Decay the counts by `observations` new ones (lazily: the unit shrinks) and return the weight, in units,
        of an observation added now."""
        self._rates = None
        self._unit *= DECAY ** observations
        if self._unit < 1e-100:  # fold the unit back into the counts before it underflows
            self._success, self._trials, self._unit = self.success, self.trials, 1.0
        return 1.0 / self._unit

    def add_run(self, n: int, failed: bool) -> None:
        """One run that starts at a round: `add([True] * n + [False] * failed)`, without the list (a round's
        outcomes, every round of a decode)."""
        length = n + failed
        if not length:
            return
        w, success, trials = self._weight(length), self._success, self._trials
        for j in range(min(length, len(trials))):
            trials[j] += w
        for j in range(min(n, len(success))):
            success[j] += w

    def shrink(self, most: float) -> None:
        """Scale the counts down, rates unchanged, so that at most `most` runs are counted at depth 1. A layer's
        counts decay only as it is observed; a layer left long ago would otherwise keep its old text's weight."""
        if self.runs() > most:
            self._rates = None
            self._unit *= most / self.runs()

    def rates(self) -> list[float]:
        """P(run goes on at depth j | it reached j), j = 1..depth, each shrunk by one pseudo-observation towards
        the rate of the depth before it (depth 1: towards the pooled rate, itself towards 1/2). Depths past the
        drafts chosen so far are never observed (a round of cap k says nothing about draft k + 1), and in bursty
        text the rate rises with depth: an unseen depth takes the deepest seen one's rate, not the pooled rate,
        which would keep d where it happens to be."""
        if self._rates is None:
            u = self._unit
            prior = (sum(self._success) * u + 0.5) / (sum(self._trials) * u + 1)
            out = []
            for s, t in zip(self._success, self._trials):
                prior = (s * u + prior) / (t * u + 1)
                out.append(prior)
            self._rates = out
        return self._rates


@dataclass
class AutoPlan:
    """The (E, d) choice of one generation (or one batch): estimates, costs, and the round counter.

    Per candidate layer, two RunStats over positions whose context the verifier confirmed: `accepted` (the draft
    is confident and equals the verifier's token) and `confident` (the draft clears the confidence threshold: a
    row drafts while its drafts do, accepted or not; always true with threshold 0). A round of cap k then emits
    1 + sum_j prod_{i<=j} a_i tokens per row and drafts at least j deep with probability prod_{i<=j} c_i.

    Args:
        costs: StepCosts covering the row counts the decode will run.
        num_layers: L.
        candidates: the exit layers it may choose (candidate_layers).
        max_speculations: the longest draft it may choose.
        start: the exit layer of the first rounds (the model's stored E, else the middle candidate).
        threshold: the confidence threshold drafting uses (0: off).
    """

    costs: StepCosts
    num_layers: int
    candidates: tuple[int, ...]
    max_speculations: int
    start: int
    start_speculations: int | None = None  # d of the warm-up rounds (the model's stored d), else the prior's best
    threshold: float = 0.0
    stored_start: bool = False  # `start` is the model's stored (tuned) E: held, left only on evidence, tried again
    accepted: dict[int, RunStats] = field(default_factory=dict)  # from each layer's own rounds
    confident: dict[int, RunStats] = field(default_factory=dict)
    shadow_accepted: dict[int, RunStats] = field(default_factory=dict)  # from probes
    shadow_confident: dict[int, RunStats] = field(default_factory=dict)
    rounds: int = 0
    exit_layer: int = 0
    measured: dict[tuple[int, int], list] = field(default_factory=dict)  # (E, B) -> [tokens, s, last round, n]
    _others: tuple | None = field(default=None, repr=False)  # (B, {E: (predicted tokens/s, k)}) for other layers
    _probing: bool = field(default=False, repr=False)  # the round just chosen is a probe round
    _trial: tuple[int, int] | None = field(default=None, repr=False)  # (E, round) of the last switch on prediction
    _carried: bool = field(default=False, repr=False)  # `start` is where the last generation ended: left on evidence
    _capped: bool = field(default=False, repr=False)  # the last round drafted to its cap, every draft accepted
    _settled: int = field(default=0, repr=False)  # no switch until after this round (back from a lost trial)
    _last_round: dict[int, int] = field(default_factory=dict, repr=False)  # E -> the last round run at E
    _priced: tuple | None = field(default=None, repr=False)  # ((E, B), round, best_round(E, B)) of `_current`
    _step_guess: tuple[int, float] | None = field(default=None, repr=False)  # (B, predicted step tokens/s)
    _was_quiet: bool = field(default=False, repr=False)  # the last round chosen ran the stored settings (_quiet)
    _engaged: int = field(default=0, repr=False)  # the round choosing (and probing) last started after quiet rounds
    memory: dict | None = field(default=None, repr=False)  # the engine's estimates from earlier generations
    warmup: int = WARMUP_ROUNDS  # rounds that probe every candidate before any switch

    def __post_init__(self):
        tables = (self.accepted, self.confident, self.shadow_accepted, self.shadow_confident)
        if self.memory and "tables" in self.memory:  # the estimates go on from the last generation's
            for table, kept in zip(tables, self.memory["tables"]):
                for stats in kept.values():
                    stats.shrink(CARRIED)
                table.update(kept)
            if not self.stored_start:  # else the stored E: the last one suited the end of the last text
                self.start, self._carried = self.memory["exit_layer"], True
            self.warmup = 1
        else:
            for e in self.candidates:
                for table in tables:
                    table[e] = RunStats(self.max_speculations)
            if self.memory is not None:
                self.memory["tables"] = tables
        self.exit_layer = min(self.candidates, key=lambda e: abs(e - self.start))

    def observe_round(self, E: int, r) -> None:
        """A round at E (self_speculative.Round): its a accepted drafts, then a failure (a rejected draft, or an
        unsure stop) unless drafting reached its cap with every draft accepted; its drafts' confidence (an
        unsure stop ends them); and its probes' shadow outcomes."""
        self._last_round[E] = self.rounds
        self._capped = not r.unsure and 0 < r.accepted == r.drafted
        self.accepted[E].add_run(r.accepted, r.accepted < r.drafted or r.unsure)
        if self.threshold > 0:
            self.confident[E].add_run(r.drafted, bool(r.unsure))
        if r.shadow:
            self.observe_shadow(r.shadow)

    def observe_shadow(self, shadow: dict[int, list[tuple[list[bool], list[bool]]]]) -> None:
        """A probe's outcomes: {exit layer: [(accepted flags, confident flags) per row's confirmed positions]}."""
        for e, seqs in shadow.items():
            for accepted, confident in seqs:
                self.shadow_accepted[e].add(accepted, starts=True)
                if self.threshold > 0:
                    self.shadow_confident[e].add(confident, starts=True)

    def _rates(self, E: int, real: dict, shadow: dict) -> list[float]:
        """Depth-wise rates for layer E: from its own rounds where it has had enough of them lately (the current
        layer, or one left within FRESH_FOR rounds: the counts of a layer left long ago describe old text, and they
        decay only while it is observed); else from its shadow outcomes, calibrated by how the current layer's
        shadow outcomes compare with its real ones (probed positions are those the current layer's drafts got
        right: easy ones, which flatter every shadow)."""
        if E == self.exit_layer or (real[E].runs() >= REAL_ENOUGH
                                    and self.rounds - self._last_round.get(E, -FRESH_FOR) <= FRESH_FOR):
            return real[E].rates()
        here, ref, theirs = real[self.exit_layer].rates(), shadow[self.exit_layer].rates(), shadow[E].rates()
        return [min(0.999, t * min(2.0, max(0.5, h / f))) for t, h, f in zip(theirs, here, ref)]

    def _probes(self, r: int) -> tuple[int, ...]:
        """The layers round r measures (empty: not a probe round), the current E always among them (it calibrates
        the others): every candidate in the first rounds, then every PROBE_EVERY rounds the current E's
        neighbours and one more in turn."""
        if r < self.warmup:
            return self.candidates
        if (r - self._engaged) % PROBE_EVERY:
            return ()
        others = [e for e in self.candidates if e != self.exit_layer]
        if not others:
            return ()
        i = self.candidates.index(self.exit_layer)
        near = {self.candidates[j] for j in (i - 1, i, i + 1) if 0 <= j < len(self.candidates)}
        near.add(others[(r // PROBE_EVERY) % len(others)])
        return tuple(sorted(near))

    def best_round(self, E: int, B: int) -> tuple[float, int]:
        """(predicted tokens per second, k) of the best round at exit layer E for B rows: every row's expected
        tokens over the cost of the passes the deepest-drafting row makes (a pass serves every row, padded to
        the widest)."""
        c, L = self.costs, self.num_layers
        a = self._rates(E, self.accepted, self.shadow_accepted)
        u = self._rates(E, self.confident, self.shadow_confident) if self.threshold > 0 else [1.0] * len(a)
        early = c.fixed + E * c.at_layer(B)
        head = c.at_draft_head(B)
        layer, full_head = c.by_row
        last = len(layer) - 2
        best, tokens, reach, deepest, survive = (0.0, 0), 1.0, 1.0, 0.0, 1.0
        for k in range(1, self.max_speculations + 1):
            survive *= a[k - 1]
            tokens += survive  # expected tokens per row of a round of cap k
            reach *= u[k - 1]  # P(a row drafts >= k)
            deepest += 1 - (1 - reach) ** B  # E[max over B rows of drafts]
            unsure = 1 - reach ** B  # P(some row ends its drafting on an unsure head)
            rows = B * (1 + deepest)  # the verify pass's; between whole row counts i and i + 1
            i = int(rows)
            if i <= last:
                f = rows - i
                late = (c.fixed + (L - E) * (layer[i] + f * (layer[i + 1] - layer[i]))
                        + full_head[i] + f * (full_head[i + 1] - full_head[i]))
            else:
                late = c.fixed + (L - E) * c.at_layer(rows) + c.at_head(rows)
            cost = (1 + deepest) * early + min(k, deepest + unsure) * head + late
            value = B * tokens / cost
            if value >= best[0]:  # ties: the longer draft
                best = (value, k)
        return best

    def observe_speed(self, E: int, B: int, tokens: int, seconds: float) -> None:
        """A round's wall time at E (AR: an autoregressive step) for B rows and the tokens it emitted. Probe rounds
        are not counted: their shadow heads are work an ordinary round at E does not do; nor is a generation's first
        round, which carries the prompt's prefill; nor are quiet rounds (`_quiet`), which compare no speeds (once
        they end, the stored E's speed is measured afresh, as the text that ended them is)."""
        if self._probing or self.rounds <= 1 or self._was_quiet:
            return
        m = self.measured.get((E, B))
        if m is None or self.rounds - m[2] > self._fresh_for(E):  # stale: measured afresh, the old text forgotten
            m = self.measured[(E, B)] = [0.0, 0.0, 0, 0]
        m[0], m[1], m[2], m[3] = m[0] * SPEED_DECAY + tokens, m[1] * SPEED_DECAY + seconds, self.rounds, m[3] + 1

    @staticmethod
    def _fresh_for(E: int) -> int:
        return MEASURED_FOR if E == AR else FRESH_FOR

    def _measured(self, E: int, B: int) -> float | None:
        """Tokens per second measured at (E, B) over its last rounds, if it has had MEASURED_ROUNDS of them and
        the last within FRESH_FOR rounds (autoregressive steps: MEASURED_FOR). A layer's speed measured on
        older text is no guide: text changes along a generation (its first rounds are the hardest), and a layer
        left early on a low speed would stay left."""
        m = self.measured.get((E, B))
        if m is None or m[3] < MEASURED_ROUNDS or self.rounds - m[2] > self._fresh_for(E) or m[1] <= 0:
            return None
        return m[0] / m[1]

    def choose(self, B: int) -> tuple[int, int, tuple[int, ...]]:
        """(E, k, probe layers) for the next round of B rows. k = 0: an autoregressive step is predicted faster
        than any round; a probe round is a round whatever the prediction, so the estimates stay fresh.

        Layers are compared by measured speed where there is one (the current layer's, or one tried lately), else
        by the cost model's prediction scaled by how the current layer's measured speed compares with its own
        prediction. The other layers' predictions change only on probe rounds: recomputed only then, only while
        some layer may be switched to (none may while the stored E is held), and only for those that may be; the
        current layer's every PRICE_EVERY rounds (`_current`)."""
        r = self.rounds
        self.rounds += 1
        if self._quiet(B):  # the stored settings as they are: nothing to choose, nothing to probe
            self._probing, self._was_quiet = False, True
            if self.memory is not None:
                self.memory["exit_layer"] = self.exit_layer
            return self.exit_layer, min(self.start_speculations or self._current(B)[1], self.max_speculations), ()
        if self._was_quiet:  # the stored E stopped paying: probes start now
            self._was_quiet, self._engaged = False, r
        current = self._current(B)
        if r < self.warmup and self.start_speculations:  # nothing measured yet: the stored d, if any
            current = (current[0], min(self.start_speculations, self.max_speculations))
        if r >= self.warmup and self._retry_start(B):
            self._trial, self.exit_layer, self._others = (self.start, self.rounds), self.start, None
            current = self.best_round(self.start, B)
        elif r >= self.warmup and not self._on_trial(B) and self.rounds > self._settled:  # no switch on no evidence
            known = self._switchable(B)
            if known and (self._others is None or self._others[0] != B or not self._others[1].keys() >= set(known)):
                self._others = (B, {E: self.best_round(E, B) for E in known})
            here = self._measured(self.exit_layer, B)
            scale = here / current[0] if here else 1.0
            value = lambda E: self._measured(E, B) or self._others[1][E][0] * scale
            best = max(known, key=value, default=None)
            # a prediction must beat the current layer clearly; a layer measured faster lately wins outright
            gain = MEASURED_GAIN if here and best is not None and self._measured(best, B) else SWITCH_GAIN
            if best is not None and value(best) > (here or current[0]) * gain:
                if self._measured(best, B) is None:
                    self._trial = (best, self.rounds)
                elif self._trial is not None and self._trial[0] == self.exit_layer:  # a trial lost: back, and stay
                    self._settled = self.rounds + HOLD_ROUNDS
                self.exit_layer, current = best, self._others[1][best]
                self._others = None
        if self.memory is not None:
            self.memory["exit_layer"] = self.exit_layer
        probes = self._probes(r)
        self._probing = bool(probes)
        if probes:
            self._others = None  # their estimates are about to change
            # after a round that reached its cap, a probe round drafts past the chosen k: a round of cap k says
            # nothing about draft k + 1, so a depth once seen failing would otherwise keep k below it for good
            # (probe rounds are not timed; where drafts fail, a longer draft would only cost the heads)
            deeper = (min(self.max_speculations, PROBE_DEPTH * current[1] + 2) if r >= self.warmup and self._capped
                      else current[1])
            return self.exit_layer, deeper, probes
        return self.exit_layer, (0 if self._step_instead(r, B, current[0]) else current[1]), ()

    def _quiet(self, B: int) -> bool:
        """Whether the next round runs the model's stored settings as they are, with no probe and no choice of E (d: the
        stored d, else the priced best): at batch 1, at the stored E, for the generation's first FRESH_FOR rounds (as
        the stored E is held), and then while the stored E pays: its best round, priced from its own rounds'
        acceptance (`_current`), predicted at least KEEP_PAYING times as fast as an autoregressive step. Both sides
        are the cost model's, so a slow spell of the machine, or a cost table timed in one, does not wake it. A tuned
        E and d that pay on this text are what a sweep found best on the model's own kind of text; on the built-in
        model no other static cell near them is measurably faster (benchmarks/stored_neighbours.py), and probing and
        choosing there cost up to 3% of the decode for nothing measurable (benchmarks/auto_decompose.py). Where the
        stored E stops paying, auto probes and chooses as it does with no stored E."""
        if B != 1 or not self.stored_start or self.exit_layer != self.start:
            return False
        return self.rounds <= FRESH_FOR or self._current(1, on_cap=False)[0] >= KEEP_PAYING * self._step_speed(1)

    def _current(self, B: int, on_cap: bool = True) -> tuple[float, int]:
        """best_round at the current layer for B rows, priced again only every PRICE_EVERY rounds, after a round
        that reached its cap (its d may grow at once; not `on_cap`: a price alone is wanted, not d), or when E or B
        changed. One round moves the current layer's estimates little, and pricing it every round was a third of
        what choosing cost (auto_overhead.py)."""
        key, p = (self.exit_layer, B), self._priced
        if p is None or p[0] != key or self.rounds - p[1] >= PRICE_EVERY or (on_cap and self._capped):
            p = self._priced = (key, self.rounds, self.best_round(self.exit_layer, B))
        return p[2]

    def _on_trial(self, B: int) -> bool:
        """Whether the current layer was chosen on a prediction and is not measured yet (for at most HOLD_ROUNDS
        rounds). Until it is, it stays: its few own rounds say little, and comparing them with the old layer's
        measured speed would switch back at once, and the old layer's shadow estimate forth again, round after
        round (a ping-pong between two layers that never measures either)."""
        if self._trial is None or self._trial[0] != self.exit_layer or self._measured(self.exit_layer, B):
            return False
        return self.rounds - self._trial[1] <= HOLD_ROUNDS

    def _retry_start(self, B: int) -> bool:
        """Whether to go back to the stored E for a trial: it was left, the layer it was left for has been measured,
        and the stored E's own speed is no longer fresh. Shadows cannot bring it back: a probe sees only the
        positions the current layer's drafts reached, so a deeper layer's longer runs go unseen, and the stored
        E's speed was measured on the generation's first rounds, its hardest text."""
        return (self.stored_start and self.exit_layer != self.start and not self._on_trial(B)
                and self._measured(self.exit_layer, B) is not None and self._measured(self.start, B) is None)

    def _switchable(self, B: int) -> list[int]:
        """The layers the current one may be left for. None while the model's stored E (tuned on whole generations
        of held-out prompts) is held: for the generation's first FRESH_FOR rounds (its hardest text, the fewest
        observations: on held-out code nearly every switch made that early lost) and until its own speed is
        measured (at batch 1 also while it pays: `_quiet`). Then those with evidence enough (_known)."""
        if self.stored_start and self.exit_layer == self.start and (
                self.rounds <= FRESH_FOR or self._measured(self.exit_layer, B) is None):
            return []
        return [E for E in self.candidates if E != self.exit_layer and self._known(E, B)]

    def _step_speed(self, B: int) -> float:
        """An autoregressive step's predicted tokens per second for B rows (the cost model's)."""
        if self._step_guess is None or self._step_guess[0] != B:
            self._step_guess = (B, B / self.costs.autoregressive(self.num_layers, B))
        return self._step_guess[1]

    def _known(self, E: int, B: int) -> bool:
        """Whether there is evidence enough to leave the current layer for E. Leaving the model's stored E, or the
        E the last generation ended at (no stored E), takes a measured speed at E, enough rounds of its own, or
        enough probed positions: a few warm-up probes of short rounds say little. Any other current layer was a
        guess or a choice on evidence, and the estimates alone decide."""
        if not ((self.stored_start or self._carried) and self.exit_layer == self.start):
            return True
        return (self._measured(E, B) is not None or self.accepted[E].runs() >= REAL_ENOUGH
                or self.shadow_accepted[E].runs() >= SHADOW_ENOUGH)

    def _step_instead(self, r: int, B: int, predicted: float) -> bool:
        """Whether an autoregressive step beats the current layer's round for B > 1 rows: measured against measured
        where both are (a step's speed is measured in a few steps tried once the warm-up is over, where the
        prediction puts it within STEP_WITHIN of the measured round, and again when that goes stale), else
        predicted against predicted."""
        guess = self._step_speed(B)
        if B == 1:  # one row: a round's speed swings with the text, a step's does not; only the prediction decides
            return guess > predicted
        here, step = self._measured(self.exit_layer, B), self._measured(AR, B)
        if step is None and here is not None and r >= self.warmup and guess * STEP_WITHIN > here:
            return True
        if step is not None and here is not None:
            return step > here
        return guess > predicted


def stored_exit_layer(stack: LayerStack) -> int | None:
    """The exit layer stored with the model (where auto starts), if any."""
    e = model_defaults(stack.model).get("exit_layer")
    return e if isinstance(e, int) and 1 <= e < stack.num_layers else None


def new_plan(stack: LayerStack, vocab: torch.Tensor | None, *, start: int | None, max_speculations: int | None,
             max_rows: int, threshold: float = 0.0) -> AutoPlan:
    """An AutoPlan for this engine: costs timed (or reused), every candidate layer, starting at `start`
    (None: the middle of the candidates), choosing drafts of at most `max_speculations` (None: 12), drafting
    with confidence threshold `threshold`. A later plan on the same engine and settings goes on from the
    estimates of the earlier ones (`stack.auto_memory`), each counted as at most CARRIED runs (a layer's counts
    decay only while it is observed, so a layer last used on the old text's loop would keep its weight), with one
    warm-up round instead of WARMUP_ROUNDS; it starts at the model's stored E, else at the exit layer they last
    chose (where the last text ended is no guide to where a new one starts, when a tuned E is known)."""
    candidates = candidate_layers(stack.num_layers)
    d = max_speculations or MAX_SPECULATIONS
    costs = step_costs(stack, vocab, max_rows * (d + 1))
    stored_d = model_defaults(stack.model).get("num_speculations")
    memory = stack.auto_memory.setdefault((None if vocab is None else int(vocab.numel()), float(threshold or 0.0), d),
                                          {})
    return AutoPlan(costs, stack.num_layers, candidates, d,
                    start if start is not None else candidates[len(candidates) // 2],
                    stored_d if isinstance(stored_d, int) and stored_d > 0 else None, threshold or 0.0,
                    stored_start=start is not None and start in candidates, memory=memory)


def shadow_outcomes(stack: LayerStack, hidden: dict[int, torch.Tensor], targets: torch.Tensor, spans: list[int],
                    vocab: torch.Tensor | None, threshold: float) -> dict[int, list[tuple[list[bool], list[bool]]]]:
    """{layer: [(accepted, confident) flags per row]} for hidden states {layer: (n, H)} at n confirmed positions
    (rows' spans of `spans` positions each, in order) whose verifier tokens are `targets` (n,): whether that
    exit's (draft-head) greedy draft would be confident (`threshold`, as drafting decides it) and, confident,
    equal to the verifier's token. One head call for every layer."""
    if not hidden:
        return {}
    layers = list(hidden)
    logits = stack.logits(torch.cat([hidden[e] for e in layers]), vocab)  # (len(layers) * n, V')
    top = logits.argmax(-1)
    if vocab is not None:
        top = vocab[top]
    hit = top.view(len(layers), -1) == targets[None]  # (layers, n)
    sure = torch.ones_like(hit) if threshold <= 0 else (
        torch.softmax(logits.float(), -1).max(-1).values >= threshold).view(len(layers), -1)
    accepted, confident = (hit & sure).tolist(), sure.tolist()
    out = {}
    for i, e in enumerate(layers):
        seqs, at = [], 0
        for n in spans:
            seqs.append((accepted[i][at:at + n], confident[i][at:at + n]))
            at += n
        out[e] = seqs
    return out


def summary(exit_layers: list[int], drafts: list[int]) -> str:
    """'E 3 (81%), 4 (19%); d 6.2 on average' for the rounds' chosen exit layers and draft lengths."""
    if not exit_layers:
        return "no rounds"
    top = collections.Counter(exit_layers).most_common(3)
    parts = ", ".join(f"{e} ({100 * n / len(exit_layers):.0f}%)" for e, n in top)
    return f"E {parts}; d {sum(drafts) / len(drafts):.1f} on average"
