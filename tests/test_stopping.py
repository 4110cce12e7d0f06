"""Stop strings and the StopChecker rules."""
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import layerskip
from layerskip.decoding.stopping import StopChecker


def test_checker_eos_then_length():
    c = StopChecker(5, eos_token_ids=[9])
    assert c.accept([], [1, 2]) == ([1, 2], None)
    assert c.accept([1, 2], [3, 9, 4]) == ([3, 9], "eos")
    assert c.accept([1, 2, 3], [4, 5, 6]) == ([4, 5], "length")


def test_a_round_drafts_one_fewer_than_the_tokens_left():
    c = StopChecker(5)
    assert c.drafts([], 8) == 4 and c.drafts([], 3) == 3
    assert c.drafts([1, 2, 3, 4], 8) == 0  # the last token is the verifier's own


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoint):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval(), AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("strategy,d", [("autoregressive", None), ("self_speculative", 1), ("self_speculative", 6)])
def test_stop_string_trims_text_and_stops_at_the_completing_token(model_and_tokenizer, strategy, d):
    model, tok = model_and_tokenizer
    ids = tok("def main():\n    return").input_ids
    free = layerskip.generate(model, ids, max_new_tokens=40, eos_token_id=[], tokenizer=tok)
    text = free.text
    assert len(text) > 12
    stop = text[8:11]  # a stop string that first completes mid-output (spanning rounds for d = 1)
    first = text.find(stop)
    spec = dict(exit_layer=2, num_speculations=d) if strategy == "self_speculative" else {}
    out = layerskip.generate(model, ids, strategy=strategy, max_new_tokens=40, eos_token_id=[],
                             stop_strings=[stop, "never-appears"], tokenizer=tok, **spec)
    assert out.text == text[:first]
    assert out.stats.stop_reason == "stop_string"
    # the kept tokens are the shortest prefix of the free output whose text contains the stop string
    n = len(out.token_ids)
    assert out.token_ids == free.token_ids[:n]
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1])


def test_stop_strings_need_a_tokenizer(model_and_tokenizer):
    model, _ = model_and_tokenizer
    with pytest.raises(layerskip.LayerSkipError, match="tokenizer"):
        layerskip.generate(model, [1, 2], stop_strings=["x"])
