"""exit_layer="auto" (decoding/auto.py): lossless on every architecture, batch 1 and batched; it finds the exit an
exact-draft model agrees at, keeps off exits that disagree, and switching E between rounds leaves a valid cache."""
import types

import pytest
import torch

import layerskip
from layerskip.decoding import auto
from layerskip.decoding.autoregressive import decode_autoregressive
from layerskip.decoding.result import GenerationStats
from layerskip.decoding.sampling import SamplingParams
from layerskip.decoding.self_speculative import decode_self_speculative, run_round
from layerskip.decoding.stopping import StopChecker
from layerskip.testing import make_exact_from, make_random_model

IDS = [5, 17, 42, 9, 88, 3, 61, 23]


def exact_model(exit_layer: int, num_layers: int = 8, seed: int = 0):
    """Layers >= exit_layer are the identity on the residual stream: every exit at or above it is the model. The
    layer below them writes a large output, so exits below exit_layer (which lack it) disagree with the model,
    also where its greedy output loops (there a random model's exits tend to agree)."""
    model = make_random_model("llama", num_layers=num_layers, num_kv_heads=2, seed=seed)
    make_exact_from(model, exit_layer)
    with torch.no_grad():
        model.model.layers[exit_layer - 1].mlp.down_proj.weight.mul_(30)
    return model


def prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(length),), generator=g).tolist() for length in torch.randint(3, 12, (n,))]


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("options", [{}, dict(confidence_threshold=0.05, draft_vocab=list(range(0, 256, 2)))])
def test_auto_equals_autoregressive_on_every_architecture(tiny_models, name, options):
    engine = layerskip.prepare(tiny_models[name])
    for ids in prompts(3, seed=1):
        ar = layerskip.generate(engine, ids, max_new_tokens=40, eos_token_id=[]).token_ids
        out = layerskip.generate(engine, ids, strategy="self_speculative", exit_layer="auto", max_new_tokens=40,
                                 eos_token_id=[], **options)
        assert out.token_ids == ar
        s = out.stats
        assert len(s.exit_layer_per_round) == s.rounds == len(s.speculations_per_round)
        assert all(1 <= e < engine.num_layers for e in s.exit_layer_per_round)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3"])
def test_auto_batch_rows_equal_their_autoregressive_output(tiny_models, name):
    engine = layerskip.prepare(tiny_models[name])
    batch = prompts(5, seed=2)
    ar = [layerskip.generate(engine, p, max_new_tokens=30, eos_token_id=[]).token_ids for p in batch]
    out = layerskip.generate(engine, batch, strategy="self_speculative", exit_layer="auto", max_new_tokens=30,
                             eos_token_id=[])
    assert [o.token_ids for o in out] == ar


def settled(stats):
    """The second half of the rounds that drafted, but the last (cut by max_new_tokens): (E, d, accepted)."""
    rounds = list(zip(stats.exit_layer_per_round, stats.speculations_per_round, stats.accepted_per_round))
    return [r for r in rounds[len(rounds) // 2:-1] if r[1]]


ROWS = (1, 2, 4, 8, 16, 32)
# a CPU-like machine (seconds): a layer's cost grows slowly with rows, then linearly; the head costs about a layer
COSTS = auto.StepCosts(ROWS, layer=(4e-4, 4.5e-4, 5.5e-4, 9e-4, 1.6e-3, 3e-3), head=(3e-4, 3.5e-4, 4.5e-4, 7e-4,
                       1.2e-3, 2.2e-3), draft_head=(3e-4, 3.5e-4, 4.5e-4, 7e-4, 1.2e-3, 2.2e-3), fixed=1e-4)


class SimulatedMachine:
    """The engine's passes priced by COSTS on a clock of their own: auto sees the costs it was told, whatever
    else this machine runs, so its choices are the same on every run."""

    def __init__(self, engine):
        self.now, run, logits = 0.0, engine.run, engine.logits
        engine.step_costs[None] = COSTS  # what auto's cost model reads (not timed)

        def timed_run(h, start, end, *args, **kwargs):
            self.now += COSTS.fixed + (end - start) * COSTS.at_layer(h.shape[0] * h.shape[1])
            return run(h, start, end, *args, **kwargs)

        def timed_logits(h, vocab=None):
            rows = h.numel() // h.shape[-1]
            self.now += COSTS.at_head(rows) if vocab is None else COSTS.at_draft_head(rows)
            return logits(h, vocab)

        engine.run, engine.logits = timed_run, timed_logits

    def clock(self) -> float:
        return self.now


def auto_on_a_simulated_machine(model, n: int):
    """(auto's output and stats, the autoregressive output) for IDS and n new tokens, timed by SimulatedMachine."""
    engine = layerskip.prepare(model)
    ar = layerskip.generate(engine, IDS, max_new_tokens=n, eos_token_id=[]).token_ids
    machine, stats = SimulatedMachine(engine), GenerationStats("self_speculative")
    with torch.inference_mode():
        out = decode_self_speculative(engine, torch.tensor([IDS]), exit_layer="auto", num_speculations=None,
                                      params=SamplingParams(), stopper=StopChecker(n), stats=stats,
                                      clock=machine.clock)
    return out, stats, ar


def test_auto_settles_at_the_exit_an_exact_draft_model_agrees_at():
    tokens, stats, ar = auto_on_a_simulated_machine(exact_model(2), 160)
    assert tokens == ar
    rounds = settled(stats)
    assert rounds, "no speculative rounds after warm-up"
    assert sum(e > 2 for e, _, _ in rounds) <= 0.2 * len(rounds), rounds  # not the dearer exits that also agree
    at_e0 = [(d, a) for e, d, a in rounds if e == 2]
    assert at_e0 and all(a == d for d, a in at_e0), rounds  # every draft accepted there


def test_auto_keeps_off_early_exits_when_only_late_ones_agree():
    tokens, stats, ar = auto_on_a_simulated_machine(exact_model(6), 120)
    assert tokens == ar
    rounds = settled(stats)
    assert rounds and sum(e < 6 for e, _, _ in rounds) <= 0.2 * len(rounds), rounds


def test_switching_exit_layers_between_rounds_keeps_the_cache_valid(tiny_llama):
    """Rounds at E = 1, 3, 2, 1, ... with probes on one cache: every layer's K/V equals the autoregressive run's."""
    engine = layerskip.prepare(tiny_llama)
    n = 30
    ar_cache = engine.new_cache(len(IDS) + n)
    with torch.inference_mode():
        ar = decode_autoregressive(engine, torch.tensor([IDS]), num_layers=4, params=SamplingParams(),
                                   stopper=StopChecker(n), stats=GenerationStats("autoregressive"), cache=ar_cache)
        cache = engine.new_cache(len(IDS) + n)
        pending, pos, out, i = torch.tensor([IDS]), 0, [], 0
        while len(out) < n - 1:
            E = (1, 3, 2)[i % 3]
            k = min(3, n - 1 - len(out) - 1)
            r, pos = run_round(engine, cache, pending, pos, k, exit_layer=E, params=SamplingParams(),
                               probes=tuple(e for e in (1, 2, 3) if e != E))
            assert set(r.shadow) == {1, 2, 3} - {E}
            out += r.tokens
            pending, i = torch.tensor([[r.tokens[-1]]]), i + 1
    assert out[:n - 1] == ar[:n - 1]
    valid = pos  # every layer holds the accepted sequence [0, pos)
    for layer in range(4):
        assert torch.allclose(cache.keys[layer][..., :valid, :], ar_cache.keys[layer][..., :valid, :], atol=1e-5)
        assert torch.allclose(cache.values[layer][..., :valid, :], ar_cache.values[layer][..., :valid, :], atol=1e-5)


@pytest.mark.parametrize("options", [dict(threshold=0.0, vocab=None), dict(threshold=0.5, vocab=None),
                                     dict(threshold=0.5, vocab=torch.arange(0, 256, 2))])
def test_a_rounds_probes_equal_each_exits_drafts_from_a_full_pass(options):
    """run_round's shadow flags against the slow reference:
    each probed exit's logits from a fresh pass over the whole accepted text, at every position the round confirmed,
    compared with the text's next token."""
    model = exact_model(3, num_layers=6)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked exits: the threshold keeps some drafts and stops others
    engine = layerskip.prepare(model)
    threshold, vocab = options["threshold"], options["vocab"]
    n, rounds = 40, []
    with torch.inference_mode():
        cache = engine.new_cache(len(IDS) + n)
        pending, pos, out, i = torch.tensor([IDS]), 0, [], 0
        while len(out) < n - 6:
            E = (3, 1, 4, 2, 5)[i % 5]
            start = pos + pending.shape[1] - 1  # x0's last position
            r, pos = run_round(engine, cache, pending, pos, 4, exit_layer=E, params=SamplingParams(), vocab=vocab,
                               confidence_threshold=threshold, probes=(1, 2, 3, 4, 5))
            rounds.append((start, r))
            out += r.tokens
            pending, i = torch.tensor([[r.tokens[-1]]]), i + 1
        text = torch.tensor([IDS + out])
        hidden = {}
        engine.run(engine.embed(text), 0, engine.num_layers, engine.new_cache(text.shape[1]), 0,
                   {e: hidden.setdefault(e, []) for e in (1, 2, 3, 4, 5)})
    assert any(r.accepted for _, r in rounds) and any(r.accepted < r.drafted or r.unsure for _, r in rounds)
    for start, r in rounds:
        span = slice(start, start + r.accepted + 1)
        nxt = text[0, start + 1:start + r.accepted + 2]
        for e, h in hidden.items():
            with torch.no_grad():
                logits = engine.logits(h[0][0, span], vocab)
            top = logits.argmax(-1) if vocab is None else vocab[logits.argmax(-1)]
            sure = torch.softmax(logits, -1).max(-1).values >= threshold
            [(accepted, confident)] = r.shadow[e]
            assert confident == sure.tolist()
            assert accepted == ((top == nxt) & sure).tolist()


def test_shadow_outcomes_match_the_exits_own_drafts(tiny_llama):
    """A probe's flags are the exit's own greedy drafts compared with the verifier: checked against logits."""
    engine = layerskip.prepare(tiny_llama)
    h = torch.randn(5, 64)
    with torch.no_grad():
        logits = engine.logits(h)
    targets = logits.argmax(-1)
    targets[1] = (targets[1] + 1) % 256
    out = auto.shadow_outcomes(engine, {2: h}, targets, [3, 2], None, 0.0)
    assert out == {2: [([True, False, True], [True] * 3), ([True, True], [True] * 2)]}
    sure = torch.softmax(logits, -1).max(-1).values
    threshold = float(sure.median())
    (flags, confident), _ = auto.shadow_outcomes(engine, {2: h}, targets, [3, 2], None, threshold)[2]
    assert confident == (sure[:3] >= threshold).tolist()
    assert all(not a or c for a, c in zip(flags, confident))  # unsure drafts are never accepted


def test_run_stats_count_runs_by_depth():
    s = auto.RunStats(4)
    s.add([True, True, False])  # one round: accepted at depths 1, 2; rejected at 3
    assert [round(x, 6) for x in s.trials] == [1, 1, 1, 0] and [round(x, 6) for x in s.success] == [1, 1, 0, 0]
    s = auto.RunStats(2)
    s.add([True, False, True], starts=True)  # runs from each position: TF, F, T (censored)
    assert s.trials == [3, 1] and s.success == [2, 0]
    assert 0 < s.rates()[1] < s.rates()[0] < 1


def test_run_stats_decay_lazily_as_an_eager_reference_does():
    """Counts kept in units of the oldest observation's weight equal counts decayed at every observation, also
    after the unit has been folded back (many observations) and after a shrink; a round's run added as a count
    (add_run) as its outcomes are."""
    depth, g = 5, torch.Generator().manual_seed(0)
    s, success, trials = auto.RunStats(depth), [0.0] * depth, [0.0] * depth

    def reference_add(seq, starts):
        keep = auto.DECAY ** len(seq)
        success[:] = [x * keep for x in success]
        trials[:] = [x * keep for x in trials]
        for i in range(len(seq) if starts else 1):
            for j, ok in enumerate(seq[i:i + depth]):
                trials[j] += 1
                if not ok:
                    break
                success[j] += 1

    for step in range(3000):  # about 15000 observations: DECAY ** 15000 < 1e-100
        starts = step % 3 == 0
        if step % 3 == 1:  # a round's run (add_run), as deep as the depths counted or deeper
            n, failed = int(torch.randint(0, 2 * depth, (1,), generator=g)), step % 2 == 0
            s.add_run(n, failed)
            seq = [True] * n + [False] * failed
        else:
            seq = (torch.rand(int(torch.randint(1, 9, (1,), generator=g)), generator=g) < 0.8).tolist()
            s.add(seq, starts=starts)
        reference_add(seq, starts)
        if step % 500 == 0:
            assert s.trials == pytest.approx(trials, rel=1e-9) and s.success == pytest.approx(success, rel=1e-9)
    assert s._unit > 1e-100 and s.runs() == pytest.approx(trials[0], rel=1e-9)
    s.shrink(2.0)
    f = 2.0 / trials[0]
    assert s.trials == pytest.approx([x * f for x in trials]) and s.success == pytest.approx([x * f for x in success])


def test_exit_layer_auto_is_rejected_for_early_exit():
    with pytest.raises(layerskip.LayerSkipError, match="early exit needs a fixed exit layer"):
        layerskip.DecodeConfig("early_exit", exit_layer="auto")


def test_batched_plan_measures_steps_and_takes_the_faster():
    """B > 1: once a round's speed is measured, a few autoregressive steps are tried, then the faster one wins;
    B = 1: the prediction alone decides."""
    costs = auto.StepCosts(rows=(1, 64), layer=(1e-3, 2e-3), head=(1e-3, 2e-3), draft_head=(1e-3, 2e-3),
                           fixed=1e-4)
    plan = auto.AutoPlan(costs, num_layers=4, candidates=(1, 2, 3), max_speculations=4, start=2)
    plan.rounds = auto.WARMUP_ROUNDS + 1
    for _ in range(auto.MEASURED_ROUNDS):
        plan.observe_speed(2, 4, 8, 0.01)  # rounds at E = 2 for 4 rows: 800 tokens/s
    assert plan._step_instead(plan.rounds, 4, predicted=1e9)  # steps not measured yet: try one
    for _ in range(auto.MEASURED_ROUNDS):
        plan.observe_speed(auto.AR, 4, 4, 0.01)  # steps: 400 tokens/s
    assert not plan._step_instead(plan.rounds, 4, predicted=0.0)
    for _ in range(3 * auto.MEASURED_ROUNDS):
        plan.observe_speed(auto.AR, 4, 4, 0.002)  # steps now measure 2000 tokens/s
    assert plan._step_instead(plan.rounds, 4, predicted=1e9)
    assert not plan._step_instead(plan.rounds, 1, predicted=1e9)  # one row: predicted round 1e9 tok/s wins


def test_unseen_depths_take_the_deepest_seen_rate():
    """Rounds of cap 2 never observe draft 3: its rate follows depth 2's (bursty code raises it with depth), not
    the pooled rate, so a longer draft is worth trying."""
    s = auto.RunStats(6)
    for _ in range(20):
        s.add([True, True])  # cap 2, both accepted: depth 3 is never reached
        s.add([False])
    rates = s.rates()
    assert rates[1] > 0.9 and rates[0] < 0.6
    assert all(abs(r - rates[1]) < 0.05 for r in rates[2:])


def _costs():
    """Pass costs of a simulated machine: a layer 1 ms at one row, the head as much, the draft head a tenth."""
    return auto.StepCosts(rows=(1, 64), layer=(1e-3, 2e-3), head=(1e-3, 2e-3), draft_head=(1e-4, 2e-4), fixed=1e-4)


def _plan_with_shadow(stored_start: bool, positions: int):
    costs = _costs()
    plan = auto.AutoPlan(costs, num_layers=8, candidates=(2, 3, 5), max_speculations=4, start=3,
                         stored_start=stored_start)
    plan.rounds = auto.WARMUP_ROUNDS
    plan.accepted[3].add([False])  # the current layer's drafts fail
    plan.shadow_accepted[3].add([False] * positions, starts=True)
    plan.shadow_accepted[2].add([False] * positions, starts=True)
    plan.shadow_accepted[5].add([True] * positions, starts=True)  # another layer's shadows agree
    return plan


def _step_speed() -> float:
    """An autoregressive step's tokens per second on _costs()'s machine (8 layers)."""
    return 1 / _costs().autoregressive(8, 1)


def _measure(plan, E: int, tokens_per_s: float = 400.0) -> None:
    for _ in range(auto.MEASURED_ROUNDS):
        plan.observe_speed(E, 1, 4, 4 / tokens_per_s)


def test_a_stored_exit_layer_is_left_only_on_evidence():
    """Past the generation's first FRESH_FOR rounds, with the stored E's own speed measured, and enough probed
    positions of the other layer; a guessed start is left on the estimates alone."""
    late = auto.FRESH_FOR + 1
    enough = int(auto.SHADOW_ENOUGH) + 1
    slow = 0.9 * _step_speed()  # the stored E measured slower than autoregressive decoding: it may be left
    plan = _plan_with_shadow(stored_start=True, positions=enough)
    assert plan_choice(plan, rounds=late) == 3  # the stored E not measured yet: stay
    plan = _plan_with_shadow(stored_start=True, positions=enough)
    _measure(plan, 3, slow)
    assert plan_choice(plan) == 3  # measured, but within the generation's first rounds: stay
    plan = _plan_with_shadow(stored_start=True, positions=3)
    plan.rounds = late
    _measure(plan, 3, slow)
    assert plan_choice(plan, rounds=late) == 3  # three probed positions: stay
    plan = _plan_with_shadow(stored_start=True, positions=enough)
    plan.rounds = late
    _measure(plan, 3, slow)
    assert plan_choice(plan, rounds=late) == 5
    assert plan_choice(_plan_with_shadow(stored_start=False, positions=3)) == 5  # a guessed start: estimates decide


def test_stored_settings_that_pay_run_as_they_are_until_they_stop_paying():
    """At batch 1, the stored E and d run with no probe and no choice while the stored E's rounds (their acceptance,
    costed) beat an autoregressive step, however much another layer's shadows promise and however slow the machine
    runs; once its drafts fail, auto probes at once and may leave it. A batch is never quiet."""
    plan = _plan_with_shadow(stored_start=True, positions=int(auto.SHADOW_ENOUGH) + 1)
    plan.rounds, plan.start_speculations = 0, 3
    for r in range(3 * auto.PROBE_EVERY):
        assert plan.choose(1) == (3, 3, ())  # warm-up and probe rounds too
        plan.observe_speed(3, 1, 4, 4 / (0.5 * _step_speed()))  # a slow spell: measured slower than a step
        plan.observe_round(3, types.SimpleNamespace(accepted=3, drafted=3, unsure=False, shadow={}))
    failed = 0
    while plan._quiet(1):  # the text got hard: every draft rejected
        plan.observe_speed(3, 1, 1, 1 / (0.5 * _step_speed()))
        plan.observe_round(3, types.SimpleNamespace(accepted=0, drafted=3, unsure=False, shadow={}))
        plan.rounds += 1
        failed += 1
    assert 0 < failed <= 32  # noticed within a few dozen one-token rounds (the estimates decay per draft seen)
    E, _, probes = plan.choose(1)
    assert probes  # probes start at once, and the stored E may be left for the layer the shadows promise, once
    chosen = [E]  # its speed on the hard text is measured (quiet rounds are not timed)
    for _ in range(2 * auto.PROBE_EVERY):
        plan.observe_speed(chosen[-1], 1, 1, 1 / (0.5 * _step_speed()))
        plan.observe_round(chosen[-1], types.SimpleNamespace(accepted=0, drafted=3, unsure=False, shadow={}))
        chosen.append(plan.choose(1)[0])
    assert 5 in chosen
    batch = _plan_with_shadow(stored_start=True, positions=3)
    batch.rounds = 0
    assert batch.choose(4)[2]  # batched rounds: the warm-up probes as before


def plan_choice(plan, rounds: int = auto.WARMUP_ROUNDS + 1) -> int:
    assert rounds % auto.PROBE_EVERY  # not a probe round
    plan.rounds = rounds
    E, _, probes = plan.choose(1)
    assert not probes
    return E


def test_a_left_stored_exit_layer_is_tried_again_once_its_speed_is_stale():
    """Left for E = 5 on evidence, the stored E = 3 is measured again once its speed is FRESH_FOR rounds old and
    5's is measured (no shadow can bring it back); it stays until measured, then the faster one wins."""
    plan = _plan_with_shadow(stored_start=True, positions=int(auto.SHADOW_ENOUGH) + 1)
    plan.rounds = auto.FRESH_FOR + 1
    _measure(plan, 3, 90.0)  # below an autoregressive step's 110 tokens/s: the stored E does not pay here
    assert plan_choice(plan, rounds=auto.FRESH_FOR + 1) == 5
    plan.rounds = 2 * auto.FRESH_FOR + 3
    _measure(plan, 5, 100.0)
    assert plan._measured(3, 1) is None and plan._measured(5, 1) == pytest.approx(100.0)
    assert plan_choice(plan, rounds=2 * auto.FRESH_FOR + 3) == 3  # a trial of the stored E
    for r in range(2 * auto.FRESH_FOR + 4, 2 * auto.FRESH_FOR + 4 + auto.MEASURED_ROUNDS - 1):
        plan.rounds = r
        plan.observe_speed(3, 1, 4, 4 / 500.0)  # the stale 300 tokens/s forgotten: measured afresh
        if r % auto.PROBE_EVERY:
            assert plan_choice(plan, rounds=r) == 3  # held until measured
    plan.observe_speed(3, 1, 4, 4 / 500.0)
    assert plan._measured(3, 1) == pytest.approx(500.0)
    assert plan_choice(plan, rounds=2 * auto.FRESH_FOR + 5 + auto.MEASURED_ROUNDS) == 3  # 500 > 100: stays


def test_a_layer_left_long_ago_is_judged_by_its_shadows():
    """A layer's own rounds speak for it for FRESH_FOR rounds after its last; then its (fresher) shadows do."""
    plan = _plan_with_shadow(stored_start=False, positions=8)
    for _ in range(int(auto.REAL_ENOUGH) + 1):
        plan.accepted[5].add([False])  # E = 5's own rounds, all rejected...
    plan.observe_round(5, types.SimpleNamespace(accepted=0, drafted=1, unsure=False, shadow={}))
    plan.rounds += auto.FRESH_FOR
    assert plan._rates(5, plan.accepted, plan.shadow_accepted)[0] < 0.2  # ...still count
    plan.rounds += 1
    assert plan._rates(5, plan.accepted, plan.shadow_accepted)[0] > 0.5  # the shadows, which all agree


def test_a_probe_round_after_a_capped_round_drafts_past_the_chosen_length(monkeypatch):
    monkeypatch.setattr(auto, "KEEP_PAYING", float("inf"))  # the stored E never pays: auto chooses and probes
    for accepted, drafted, deeper in ((2, 2, True), (1, 2, False), (0, 0, False)):
        plan = _plan_with_shadow(stored_start=True, positions=3)
        plan.rounds = auto.PROBE_EVERY * 3  # a probe round, past the warm-up
        plan.observe_round(3, types.SimpleNamespace(accepted=accepted, drafted=drafted, unsure=False, shadow={}))
        chosen = plan.best_round(3, 1)[1]
        E, k, probes = plan.choose(1)
        assert probes and E == 3
        assert k == (min(plan.max_speculations, auto.PROBE_DEPTH * chosen + 2) if deeper else chosen)
    assert min(plan.max_speculations, auto.PROBE_DEPTH * chosen + 2) > chosen


def test_a_layer_chosen_on_a_prediction_is_kept_until_measured():
    """Shadows promise E = 5, whose own rounds then fail: auto stays at 5 until 5's speed is measured, then goes
    back to the faster measured E = 3 and stays there; it never swings between the two before 5 is measured."""
    costs = _costs()
    plan = auto.AutoPlan(costs, num_layers=8, candidates=(2, 3, 5), max_speculations=4, start=3)
    plan.rounds = auto.WARMUP_ROUNDS
    for _ in range(auto.MEASURED_ROUNDS):
        plan.observe_speed(3, 1, 10, 0.01)  # E = 3 measured: 1000 tokens/s
    plan.accepted[3].add([False])
    plan.shadow_accepted[3].add([False] * 20, starts=True)
    plan.shadow_accepted[2].add([False] * 20, starts=True)
    plan.shadow_accepted[5].add([True] * 20, starts=True)  # E = 5's shadows agree
    chosen = []
    for _ in range(12):
        E, _, _ = plan.choose(1)
        chosen.append(E)
        if E == 5:
            plan.accepted[5].add([False])  # its real drafts fail
            plan.observe_speed(5, 1, 5, 0.01)  # 500 tokens/s
        else:
            plan.observe_speed(3, 1, 10, 0.01)
    first_back = chosen.index(3)
    assert chosen[0] == 5 and first_back > 1
    assert plan._measured(5, 1) is not None or first_back > auto.HOLD_ROUNDS
    assert chosen[first_back:] == [3] * (len(chosen) - first_back)


def test_a_later_generation_starts_where_the_last_one_settled():
    engine = layerskip.prepare(exact_model(2))
    first = layerskip.generate(engine, IDS, strategy="self_speculative", exit_layer="auto", max_new_tokens=160,
                               eos_token_id=[])
    assert first.stats.exit_layer_per_round[0] != 2  # no stored E: it starts at the middle candidate
    memory = next(iter(engine.auto_memory.values()))
    learnt = memory["exit_layer"]
    assert learnt <= 2
    other = IDS[::-1] + [7, 7]
    second = layerskip.generate(engine, other, strategy="self_speculative", exit_layer="auto", max_new_tokens=60,
                                eos_token_id=[])
    assert second.stats.exit_layer_per_round[0] == learnt
    assert second.token_ids == layerskip.generate(engine, other, max_new_tokens=60, eos_token_id=[]).token_ids
    fresh = auto.new_plan(layerskip.prepare(exact_model(2)), None, start=None, max_speculations=None, max_rows=1)
    assert fresh.warmup == auto.WARMUP_ROUNDS and engine.auto_memory and len(engine.auto_memory) == 1


def test_a_later_plan_starts_at_the_stored_exit_layer_else_where_the_last_settled():
    for stored, expected in ((True, 3), (False, 5)):
        memory = {}
        first = auto.AutoPlan(_costs(), 8, (2, 3, 5), 4, start=3, stored_start=stored, memory=memory)
        assert first.exit_layer == 3 and first.warmup == auto.WARMUP_ROUNDS
        memory["exit_layer"] = first.exit_layer = 5  # the last text's end suited E = 5 (as choose records it)
        later = auto.AutoPlan(_costs(), 8, (2, 3, 5), 4, start=3, stored_start=stored, memory=memory)
        assert later.exit_layer == expected and later.warmup == 1
        assert (later.stored_start, later._carried) == (stored, not stored)  # no stored E: not held, as one is


def test_carried_estimates_count_as_priors_with_their_rates_kept():
    memory = {}
    first = auto.AutoPlan(_costs(), 8, (2, 3, 5), 4, start=3, stored_start=True, memory=memory)
    for _ in range(40):  # a looping tail: exit 2's rounds all accepted
        first.accepted[2].add([True, True, True, False])
    first.accepted[5].add([True, False])  # one run: below the cap, kept as it is
    memory["exit_layer"] = 2
    before = list(first.accepted[2].success), list(first.accepted[2].trials), list(first.accepted[5].trials)
    later = auto.AutoPlan(_costs(), 8, (2, 3, 5), 4, start=3, stored_start=True, memory=memory)
    s = later.accepted[2]
    assert before[1][0] > auto.REAL_ENOUGH and s.trials[0] == pytest.approx(auto.CARRIED)
    assert [x / t for x, t in zip(s.success, s.trials) if t] == pytest.approx(
        [x / t for x, t in zip(*before[:2]) if t])
    assert later.accepted[5].trials == before[2]
    assert not later._known(2, 1)  # no longer evidence enough to leave the stored E on the old text's counts


def test_back_from_a_lost_trial_it_stays_a_while():
    """A trial (E = 5) measured slower than the layer it left: back to E = 3, which then keeps for HOLD_ROUNDS
    rounds although E = 2's shadows promise more; a trial after every return would cost a trial's rounds each time."""
    plan = auto.AutoPlan(_costs(), 8, (2, 3, 5), 4, start=3)
    for _ in range(4):
        plan.accepted[3].add([True, False])
        plan.shadow_accepted[3].add([True, False], starts=True)
    plan.rounds = 20
    _measure(plan, 3, 400.0)
    plan.exit_layer, plan._trial = 5, (5, 15)
    _measure(plan, 5, 200.0)  # the trial measured: half E = 3's speed
    assert plan_choice(plan, rounds=21) == 3  # back on measured speeds
    plan.shadow_accepted[2].add([True] * 8, starts=True)  # now E = 2 looks better than E = 3
    chosen = {r: plan_choice(plan, rounds=r) for r in range(22, 22 + auto.HOLD_ROUNDS + 4) if r % auto.PROBE_EVERY}
    assert all(E == 3 for r, E in chosen.items() if r <= 21 + auto.HOLD_ROUNDS)
    assert 2 in chosen.values()  # and then E = 2 gets its trial


def test_the_current_layer_is_priced_again_after_price_every_rounds_and_at_once_after_a_capped_round():
    """`choose` reuses the current layer's best round for PRICE_EVERY rounds: the d it takes is a fresh
    best_round's again by then, and at once after a round that reached its cap (where d may grow)."""
    plan = auto.AutoPlan(_costs(), num_layers=8, candidates=(2, 3, 5), max_speculations=8, start=3,
                         stored_start=True)
    plan.rounds = auto.WARMUP_ROUNDS + 1
    for _ in range(12):
        plan.accepted[3].add([True] * 4 + [False])  # runs of four: d = 4 or so
    fresh = lambda: plan.best_round(3, 1)[1]
    _, before, _ = plan.choose(1)
    assert before == fresh()
    for _ in range(40):
        plan.accepted[3].add([True, False])  # its drafts now fail at the second: the best d falls...
    assert fresh() < before
    for _ in range(auto.PRICE_EVERY - 1):
        plan.rounds += plan.rounds % auto.PROBE_EVERY == 0  # probe rounds draft another length
        assert plan.choose(1)[1] == before  # ...within PRICE_EVERY rounds, the last price stands
    plan.rounds += plan.rounds % auto.PROBE_EVERY == 0
    assert plan.choose(1)[1] == fresh()  # then priced again
    for _ in range(40):
        plan.accepted[3].add([True] * 8)  # every draft accepted: the best d grows
    plan.observe_round(3, types.SimpleNamespace(accepted=8, drafted=8, unsure=False, shadow={}))
    plan.rounds += plan.rounds % auto.PROBE_EVERY == 0
    assert plan.choose(1)[1] == fresh() == 8  # priced at once after the capped round
