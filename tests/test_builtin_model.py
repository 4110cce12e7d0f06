"""The shipped built-in model decodes with its stored settings, losslessly."""
import layerskip


def test_builtin_model_stored_settings_decode_losslessly():
    model, tokenizer = layerskip.load()
    stored = model.config.layerskip
    assert {"exit_layer", "num_speculations", "confidence_threshold"} <= set(stored)
    assert len(model.draft_vocab_ids) == 1024 == len(set(model.draft_vocab_ids))
    ids = tokenizer("def add(a, b):").input_ids
    engine = layerskip.prepare(model)
    ss = layerskip.generate(engine, ids, strategy="self_speculative", max_new_tokens=24, tokenizer=tokenizer)
    s = ss.stats
    assert (s.exit_layer, s.num_speculations, s.confidence_threshold, s.draft_vocab_size) == (
        stored["exit_layer"], stored["num_speculations"], stored["confidence_threshold"], 1024)
    assert ss.token_ids == layerskip.generate(engine, ids, max_new_tokens=24).token_ids
    assert s.accepted > 0


def test_batched_drafting_stops_when_the_drafts_no_longer_pay(monkeypatch):
    """With its stored confidence threshold, a batch of the built-in model's rows drafts in fewer (B, 1) passes
    than it would if every confident row kept drafting (`_worth_a_pass`), and every row still equals its
    batch-1 greedy output."""
    from layerskip.decoding import batch

    model, tokenizer = layerskip.load()
    engine = layerskip.prepare(model)
    texts = ["def add(a, b):", "import os\n\n\ndef main():\n", "class Stack:\n    def push(self, x):",
             "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\""]
    ids = [tokenizer(t).input_ids for t in texts]
    alone = [layerskip.generate(engine, p, max_new_tokens=40).token_ids for p in ids]
    passes = []
    embed = engine.embed
    engine.embed = lambda t: passes.append(t.shape) or embed(t)

    def one_token_passes(**kw):
        passes.clear()
        out = layerskip.generate(engine, ids, strategy="self_speculative", max_new_tokens=40, **kw)
        assert [r.token_ids for r in out] == alone
        return sum(1 for shape in passes if shape[1:] == (1,))

    ruled = one_token_passes()
    monkeypatch.setattr(batch, "_worth_a_pass", lambda *a: True)
    assert ruled < one_token_passes()
