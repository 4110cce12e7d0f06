"""Metrics on hand-computed cases."""
import pytest

from layerskip.errors import LayerSkipError
from layerskip.evaluation.metrics import exact_match, normalize_answer, pass_at_k, repetition, rouge, truncate_at_stop


def test_rouge_by_hand():
    # pred "the cat sat" vs ref "the cat ran": unigrams 2/3 both ways; bigrams {the cat} of 2; LCS 2.
    scores = rouge(["the cat sat"], ["the cat ran"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(1 / 2)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    assert rouge(["a b c"], ["a b c"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge(["x y"], ["a b"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # Means over samples: (1 + 0) / 2.
    assert rouge(["a b", "x"], ["a b", "y"])["rouge1"] == pytest.approx(0.5)
    # "c a b" vs "a b c": every unigram matches, bigram {a b} of 2, LCS "a b" = 2 of 3.
    scores = rouge(["c a b"], ["a b c"])
    assert scores["rouge1"] == 1.0 and scores["rouge2"] == pytest.approx(0.5)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_exact_match():
    assert normalize_answer("  [IN:A   [SL:B x ] ]\n") == "[IN:A [SL:B x ] ]"
    assert exact_match(["[IN:A ]", " [IN:A]"], ["[IN:A ]", "[IN:A ]"]) == 0.5
    assert exact_match(["x"], ["X"]) == 0.0  # case matters for parses
    with pytest.raises(LayerSkipError, match="no samples"):
        exact_match([], [])
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_truncate_at_stop():
    code = "    return 1\n\ndef other():\n    pass\nprint(1)"
    assert truncate_at_stop(code, ["\ndef ", "\nprint("]) == "    return 1\n"
    assert truncate_at_stop("abc", []) == "abc"
    assert truncate_at_stop("a\nb", None) == "a\nb"


def test_pass_at_k():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 * 2) / (4 * 3))


def test_repetition_by_hand():
    # 1 2 3 4 1 2 3 4 1 2: seven 4-grams, four distinct (1234, 2341, 3412, 4123) -> 3/7 repeat
    assert repetition([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2]]) == pytest.approx(3 / 7)
    assert repetition([[5] * 10]) == pytest.approx(1 - 1 / 7)  # one loop of one token
    assert repetition([list(range(12))]) == 0.0
    # the mean over completions; one shorter than 4 tokens is left out
    assert repetition([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], list(range(12)), [1, 2]]) == pytest.approx(3 / 14)
    assert repetition([[1, 2, 3]]) is None and repetition([[1, 1, 1]], n=2) == pytest.approx(0.5)
