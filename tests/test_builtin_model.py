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
