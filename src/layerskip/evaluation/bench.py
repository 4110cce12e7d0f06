"""Quality + speed benchmark: every strategy over a task's prompts, side by side in one run.

Fair timing, so that ratios mean something on a noisy machine:
  - a warm-up pass (each strategy once on the first prompt, full length) before anything is timed;
  - strategies are interleaved per prompt, and the order rotates from prompt to prompt, so slow
    spells of the machine fall on every strategy alike;
  - every strategy is timed the same way: wall clock around one call, prefill included.

Reported per strategy (`StrategyResult`): tokens/s and ms/token over all prompts (total new tokens /
total seconds), speedup = tokens/s ÷ autoregressive tokens/s from the same run, acceptance rate
(accepted drafts / drafted), match rate (the fraction of prompts whose greedy token ids equal
autoregressive's), the task's metrics on the completions, and for early exit / self-speculative the
cost model's predicted speedup (see cost_model.py) beside the measured one.

With `compare_transformers=True` two more rows time transformers' own `generate()`: greedy, and
`assistant_early_exit=E` with d drafts per round. The latter reads `num_assistant_tokens`,
`num_assistant_tokens_schedule` and `assistant_confidence_threshold` from `model.generation_config`
(passed to `generate()` they are silently ignored), so they are set there for the call
(d, "constant", 0) and restored afterwards.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import warnings
from dataclasses import asdict, dataclass, field

import torch

from layerskip.decoding.api import generate, prepare
from layerskip.decoding.auto import summary as auto_summary
from layerskip.decoding.config import AUTO, DecodeConfig, LayerSkipWarning, eos_ids, normalize_strategy
from layerskip.decoding.stopping import cut_at_stop, has_stop
from layerskip.errors import LayerSkipError
from layerskip.evaluation import cost_model
from layerskip.evaluation.metrics import repetition
from layerskip.evaluation.tasks import Sample, Task
from layerskip.kernels import TUNE_ROWS
from layerskip.runtime import clock, cpu_name

OURS = ("autoregressive", "early_exit", "self_speculative")
SELF_TUNING = "self_speculative_auto"  # self-speculative with exit_layer="auto", beside the fixed-E one
TRANSFORMERS = ("transformers_greedy", "transformers_early_exit")
COMPILED = "_compiled"  # with compile=True: our fixed-E strategies again on the static-shape path (decoding/static.py)


@dataclass
class StrategyResult:
    """One row of the benchmark (one strategy over all prompts)."""

    strategy: str
    exit_layer: int | None
    num_speculations: int | None
    tokens_per_second: float
    ms_per_token: float | None
    speedup: float | None
    acceptance_rate: float | None
    match_rate: float | None
    metrics: dict = field(default_factory=dict)
    predicted_speedup: float | None = None
    num_new_tokens: int = 0
    total_s: float = 0.0
    tokens_per_round: float | None = None
    confidence_threshold: float | None = None  # self-speculative drafting options in effect
    draft_vocab_size: int | None = None
    per_sequence_tokens_per_second: float | None = None  # batch_size > 1: what one sequence sees, mean over rows
    choices: str | None = None  # exit_layer "auto": the exit layers and draft lengths its rounds chose
    compile_s: float | None = None  # compiled strategies: seconds spent compiling / capturing, not in total_s


@dataclass
class BenchReport:
    """The benchmark document: `results` has one StrategyResult per strategy, baseline first."""

    model: str
    task: str
    num_samples: int
    max_new_tokens: int
    results: list[StrategyResult]
    cost_model: dict | None = None
    machine: dict = field(default_factory=dict)
    batch_size: int = 1
    completions: dict[str, list[str]] = field(default_factory=dict, repr=False)
    token_ids: dict[str, list[list[int]]] = field(default_factory=dict, repr=False)
    stats: dict[str, list] = field(default_factory=dict, repr=False)  # per strategy, per prompt: GenerationStats

    def auto_stats(self):
        """The first prompt's stats of the run with exit_layer "auto", or None."""
        for r in self.results:
            if r.exit_layer == AUTO and self.stats.get(r.strategy):
                return self.stats[r.strategy][0]
        return None

    def to_dict(self) -> dict:
        return {
            "model": self.model, "task": self.task, "num_samples": self.num_samples,
            "max_new_tokens": self.max_new_tokens, "results": [asdict(r) for r in self.results],
            "cost_model": self.cost_model, "machine": self.machine, "batch_size": self.batch_size,
        }

    def result(self, strategy: str) -> StrategyResult:
        return next(r for r in self.results if r.strategy == strategy)


def _quality(task, runs: list, score: bool) -> dict:
    """The completions' 4-gram repetition (always: the quality figure beside every speed), and with `score` the
    task's own metrics."""
    return {"repetition": repetition([r.token_ids for r in runs]), **(task.score([r.text for r in runs]) if score
                                                                      else {})}


@dataclass
class _Run:
    token_ids: list[int]
    text: str
    seconds: float
    stats: object | None = None


def parse_strategies(text: str | list[str]) -> list[str]:
    """"autoregressive,early-exit,self-speculative" -> canonical names (autoregressive always first)."""
    names = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        canon = name.replace("-", "_").lower()
        canon = canon if canon in TRANSFORMERS + (SELF_TUNING,) else normalize_strategy(name)
        if canon not in out:
            out.append(canon)
    if not out:
        raise LayerSkipError("--strategies is empty; give e.g. autoregressive,early-exit,self-speculative")
    if "autoregressive" in out:
        out.remove("autoregressive")
    return ["autoregressive"] + out  # the baseline every speedup and match rate is measured against


def run_bench(model, tokenizer, task: Task, *, strategies=OURS, exit_layer: int | None = None,
              num_speculations: int | None = None, confidence_threshold: float | None = None, draft_vocab=None,
              max_new_tokens: int = 128, compare_transformers: bool = False, warmup: bool = True, score: bool = True,
              predict: bool = True, model_name: str = "", progress: bool = True, engine=None,
              batch_size: int = 1, compile: bool = False) -> BenchReport:
    """Time `strategies` over `task.samples` (batch size 1, greedy) and score their completions.

    Args:
        model, tokenizer: a loaded supported model and its tokenizer (needed to encode the prompts).
        task: from `tasks.load_task`.
        strategies: names from OURS (dashes accepted), or SELF_TUNING ("self-speculative-auto": exit_layer
            "auto", the same drafting options, d chosen up to its own cap); autoregressive is always run, as the
            baseline.
        exit_layer, num_speculations: E and d (defaults: the model's stored values, else "auto" / L // 2 and 4).
        confidence_threshold, draft_vocab: self-speculative drafting options (see `layerskip.generate`).
        max_new_tokens: per prompt.
        compare_transformers: also time transformers' greedy and assistant_early_exit generate().
        warmup: run every strategy once on the first prompt before timing.
        score: compute the task's metrics per strategy.
        predict: measure the cost model and report predicted speedups.
        engine: the model's engine from `layerskip.prepare` (with its tuned kernels); default: an untuned one.
        batch_size: decode the prompts B at a time (our strategies only; decoding/batch.py). A row's time is its
            batch's time shared out, so tokens/s is the total throughput; `per_sequence_tokens_per_second` is
            what one sequence sees (its tokens / its batch's seconds).
        compile: also time each of our fixed-E strategies on the static-shape path ("<strategy>_compiled",
            `generate(compile=True)`: no confidence threshold there); compile time is kept out of the timings
            and reported as compile_s.
    Returns:
        BenchReport.
    """
    if tokenizer is None:
        raise LayerSkipError("this model has no tokenizer; the benchmark needs one to encode the prompts")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LayerSkipError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    strategies = parse_strategies(strategies)
    if compare_transformers:
        strategies += [s for s in TRANSFORMERS if s not in strategies]
    engine = prepare(engine if engine is not None else model)
    eos = eos_ids(model, tokenizer)
    spec = DecodeConfig("self_speculative", exit_layer=exit_layer, num_speculations=num_speculations,
                        confidence_threshold=confidence_threshold, draft_vocab=draft_vocab,
                        max_new_tokens=max_new_tokens, eos_token_id=tuple(eos) or None).resolve(model, warn=False)
    E, d = spec.exit_layer, spec.num_speculations
    fixed = [s for s in strategies if s in ("early_exit", "transformers_early_exit")]
    if E == AUTO and fixed:
        raise LayerSkipError(f"exit layer 'auto' is for self-speculative decoding; {fixed[0].replace('_', '-')} "
                             "needs a fixed --exit-layer (or leave it out of --strategies)")
    configs = {s: _strategy_config(s, spec) for s in strategies if s not in TRANSFORMERS}
    if compile:
        if E == AUTO and "self_speculative" in configs:
            raise LayerSkipError("--compile needs a fixed exit layer for self-speculative decoding: give "
                                 "--exit-layer E (exit layer 'auto' runs eagerly only)")
        twins = {s + COMPILED: c.replace(compile=True, confidence_threshold=0.0 if c.strategy == "self_speculative"
                                         else None) for s, c in configs.items() if c.exit_layer != AUTO}
        configs.update(twins)
        strategies = [s for s in strategies if s not in TRANSFORMERS] + list(twins) + [
            s for s in strategies if s in TRANSFORMERS]
    prompts = [encode_prompt(tokenizer, s, model, max_new_tokens) for s in task.samples]
    cut = sum(len(tokenizer(s.prompt).input_ids) > len(p) for s, p in zip(task.samples, prompts))
    if cut:
        warnings.warn(f"{cut} of {len(prompts)} prompts are longer than the model's positions allow with "
                      f"--max-new-tokens {max_new_tokens}: they keep their last tokens", LayerSkipWarning, stacklevel=2)

    def call(strategy: str, i: int, n: int) -> _Run:
        if strategy in TRANSFORMERS:
            return _transformers_generate(model, tokenizer, prompts[i], strategy, E, d, n, eos,
                                          list(task.samples[i].stop_strings) or None)
        cfg = configs[strategy].replace(max_new_tokens=n, stop_strings=tuple(task.samples[i].stop_strings))
        return _generate(engine, tokenizer, prompts[i], cfg)

    if not isinstance(batch_size, int) or batch_size < 1:
        raise LayerSkipError(f"--batch-size must be >= 1, got {batch_size}")
    if batch_size > 1:
        if any(s in TRANSFORMERS for s in strategies):
            raise LayerSkipError("--batch-size > 1 times our strategies only; drop --compare-transformers")
        return _bench_batched(engine, tokenizer, task, prompts, configs, batch_size, max_new_tokens, warmup, score,
                              model_name, progress)
    warm: dict[str, _Run] = {}
    if warmup:  # full length: every cache length the timed runs will see (GPU kernels, allocator, compiling)
        warm = {strategy: call(strategy, 0, max_new_tokens) for strategy in strategies}
    runs: dict[str, list[_Run]] = {s: [] for s in strategies}
    bar = _progress(len(prompts) * len(strategies), progress, f"bench {task.name}")
    for i in range(len(prompts)):
        shift = i % len(strategies)
        for strategy in strategies[shift:] + strategies[:shift]:  # rotate the order per prompt
            bar.set_postfix_str(strategy, refresh=False)
            runs[strategy].append(call(strategy, i, max_new_tokens))
            bar.update(1)
    bar.close()

    times = None
    if predict and E != AUTO and any(s in strategies for s in ("early_exit", "self_speculative")):
        times = _measure_costs(engine, E, runs.get("self_speculative"), prompts, max_new_tokens, spec)
    results = [_summarize(s, runs[s], runs["autoregressive"], E, d, times) for s in strategies]
    _add_warmup_compiling(results, warm)
    bar = _progress(len(strategies), progress and score, "scoring")
    for r in results:
        r.metrics = _quality(task, runs[r.strategy], score)
        bar.update(1)
    bar.close()
    return BenchReport(
        model=model_name, task=task.name, num_samples=len(prompts), max_new_tokens=max_new_tokens,
        results=results, cost_model=times.as_dict() if times else None, machine=machine_info(engine),
        completions={s: [r.text for r in rs] for s, rs in runs.items()},
        token_ids={s: [r.token_ids for r in rs] for s, rs in runs.items()},
        stats={s: [r.stats for r in rs] for s, rs in runs.items()},
    )


# ----------------------------------------------------------------------------------- running


def _bench_batched(engine, tokenizer, task: Task, prompts, configs: dict, batch_size: int, max_new_tokens: int,
                   warmup: bool, score: bool, model_name: str, progress: bool) -> BenchReport:
    """run_bench with the prompts decoded `batch_size` at a time, strategies interleaved per batch."""
    stops = {tuple(s.stop_strings) for s in task.samples}
    if len(stops) > 1:
        raise LayerSkipError("--batch-size > 1 needs one set of stop strings for every sample of the task")
    stop_strings = stops.pop()
    strategies = list(configs)
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]

    def call(strategy: str, rows: list[int]) -> list[_Run]:
        cfg = configs[strategy].replace(max_new_tokens=max_new_tokens, stop_strings=stop_strings)
        t0 = clock(engine.device)
        outs = generate(engine, [prompts[i] for i in rows], cfg, tokenizer=tokenizer)
        seconds = clock(engine.device) - t0 - (outs[0].stats.compile_s or 0.0)
        return [_Run(o.token_ids, o.text, seconds / len(rows), o.stats) for o in outs]

    warm = {strategy: call(strategy, batches[0])[0] for strategy in strategies} if warmup else {}  # rows share it
    runs: dict[str, list[_Run]] = {s: [] for s in strategies}
    per_sequence: dict[str, list[float]] = {s: [] for s in strategies}
    bar = _progress(len(batches) * len(strategies), progress, f"bench {task.name} (batch {batch_size})")
    for j, rows in enumerate(batches):
        shift = j % len(strategies)
        for strategy in strategies[shift:] + strategies[:shift]:
            got = call(strategy, rows)
            runs[strategy] += got
            batch_seconds = got[0].seconds * len(rows)
            per_sequence[strategy] += [len(r.token_ids) / batch_seconds for r in got if batch_seconds > 0]
            bar.update(1)
    bar.close()
    results = []
    for s in strategies:
        cfg = configs[s]
        r = _summarize(s, runs[s], runs["autoregressive"], cfg.exit_layer, cfg.num_speculations, None)
        r.per_sequence_tokens_per_second = (sum(per_sequence[s]) / len(per_sequence[s])) if per_sequence[s] else None
        results.append(r)
    _add_warmup_compiling(results, warm)
    for r in results:
        r.metrics = _quality(task, runs[r.strategy], score)
    return BenchReport(model=model_name, task=task.name, num_samples=len(prompts), max_new_tokens=max_new_tokens,
                       results=results, machine=machine_info(engine), batch_size=batch_size,
                       completions={s: [r.text for r in rs] for s, rs in runs.items()},
                       token_ids={s: [r.token_ids for r in rs] for s, rs in runs.items()},
                       stats={s: [r.stats for r in rs] for s, rs in runs.items()})


def _add_warmup_compiling(results: list[StrategyResult], warm: dict[str, _Run]) -> None:
    """A compiled strategy's compile_s also counts what its warm-up run compiled (most of it)."""
    for r in results:
        if r.compile_s is not None and r.strategy in warm:
            r.compile_s += warm[r.strategy].stats.compile_s or 0.0


def _strategy_config(strategy: str, spec) -> DecodeConfig:
    """Our strategy's DecodeConfig from the resolved self-speculative settings (E shared by early exit)."""
    if strategy == SELF_TUNING:
        return DecodeConfig("self_speculative", exit_layer=AUTO, confidence_threshold=spec.confidence_threshold,
                            draft_vocab=spec.draft_vocab if spec.draft_vocab is not None else 0,
                            eos_token_id=spec.eos_token_id)
    if strategy == "self_speculative":
        return DecodeConfig(strategy, exit_layer=spec.exit_layer, num_speculations=spec.num_speculations,
                            confidence_threshold=spec.confidence_threshold,
                            draft_vocab=spec.draft_vocab if spec.draft_vocab is not None else 0,
                            eos_token_id=spec.eos_token_id)
    return DecodeConfig(strategy, exit_layer=spec.exit_layer if strategy == "early_exit" else None,
                        eos_token_id=spec.eos_token_id)


def _generate(engine, tokenizer, prompt, config: DecodeConfig) -> _Run:
    t0 = clock(engine.device)
    out = generate(engine, prompt, config, tokenizer=tokenizer)
    seconds = clock(engine.device) - t0 - (out.stats.compile_s or 0.0)  # a first call's compiling is not decoding
    return _Run(out.token_ids, out.text, seconds, out.stats)


def _transformers_generate(model, tokenizer, prompt, strategy, E, d, max_new_tokens, eos, stops) -> _Run:
    from transformers import StoppingCriteriaList

    ids = torch.tensor([prompt], device=model.device)  # (1, T)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                  eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
    if stops:  # our rule, not `stop_strings=` (which assisted generation hands to its draft without a tokenizer)
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStringsInText(tokenizer, stops, ids.shape[1])])
    settings = {}
    if strategy == "transformers_early_exit":
        kwargs["assistant_early_exit"] = E
        settings = {"num_assistant_tokens": d, "num_assistant_tokens_schedule": "constant",
                    "assistant_confidence_threshold": 0.0}
    with _generation_config(model, settings), _quiet_transformers(), torch.inference_mode():
        t0 = clock(model.device)
        out = model.generate(ids, **kwargs)  # (1, T + n)
        seconds = clock(model.device) - t0
    # A speculative round appends several tokens before the stopping rules run: cut after the first
    # EOS or the token that completes a stop string, as our StopChecker does.
    new = out[0, ids.shape[1]:].tolist()
    for j, t in enumerate(new):
        if t in eos:
            new = new[: j + 1]
            break
    if stops:
        for j in range(len(new)):
            if has_stop(tokenizer, new[: j + 1], stops):
                new = new[: j + 1]
                break
    text = tokenizer.decode(new, skip_special_tokens=True)
    return _Run(new, cut_at_stop(text, stops), seconds, None)


class _StopStringsInText:
    """A transformers stopping criterion: stop once the new text contains a stop string (our rule)."""

    def __init__(self, tokenizer, stops, prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids, scores, **kwargs):  # (B, T) -> (B,) bool
        done = [has_stop(self.tokenizer, row[self.prompt_len:].tolist(), self.stops) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _generation_config(model, settings: dict):
    """Set attributes of model.generation_config for one call; always restore them."""
    config = model.generation_config
    saved = {k: getattr(config, k, None) for k in settings}
    try:
        for k, v in settings.items():
            setattr(config, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def encode_prompt(tokenizer, sample: Sample, model, max_new_tokens: int) -> list[int]:
    """Prompt ids; a prompt too long for the model keeps its last tokens (the "Summary:" end)."""
    ids = tokenizer(sample.prompt).input_ids
    if not ids:
        raise LayerSkipError(f"sample {sample.id}: the prompt encodes to no tokens")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(ids) + max_new_tokens > limit:
        keep = limit - max_new_tokens
        if keep < 1:
            raise LayerSkipError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt "
                                 f"in this model's {limit} positions")
        ids = ids[-keep:]
    return ids


# ------------------------------------------------------------------------------- summarizing


def _summarize(name, runs: list[_Run], baseline: list[_Run], E, d, times) -> StrategyResult:
    strategy = name.removesuffix(COMPILED)
    tokens = sum(len(r.token_ids) for r in runs)
    seconds = sum(r.seconds for r in runs)
    tps = tokens / seconds if seconds > 0 else 0.0
    base_tokens = sum(len(r.token_ids) for r in baseline)
    base_seconds = sum(r.seconds for r in baseline)
    base_tps = base_tokens / base_seconds if base_seconds > 0 else 0.0
    match = sum(r.token_ids == b.token_ids for r, b in zip(runs, baseline)) / len(runs)
    result = StrategyResult(
        strategy=name,
        exit_layer=E if strategy in ("early_exit", "self_speculative", "transformers_early_exit") else None,
        num_speculations=d if strategy in ("self_speculative", "transformers_early_exit") else None,
        tokens_per_second=tps, ms_per_token=1000.0 / tps if tps > 0 else None,
        speedup=tps / base_tps if base_tps > 0 else None, acceptance_rate=None, match_rate=match,
        num_new_tokens=tokens, total_s=seconds,
    )
    if strategy == SELF_TUNING:
        result.exit_layer, result.num_speculations = AUTO, None
    if name != strategy:
        result.compile_s = sum(r.stats.compile_s or 0.0 for r in runs)
        times = None  # the cost model times the eager path
    if result.exit_layer == AUTO:
        result.choices = auto_summary(sum((r.stats.exit_layer_per_round for r in runs), []),
                                      sum((r.stats.speculations_per_round for r in runs), []))
    if strategy in ("self_speculative", SELF_TUNING):
        drafted = sum(r.stats.drafted for r in runs)
        rounds = sum(r.stats.rounds for r in runs)
        result.acceptance_rate = sum(r.stats.accepted for r in runs) / drafted if drafted else None
        result.tokens_per_round = tokens / rounds if rounds else None
        result.confidence_threshold = runs[0].stats.confidence_threshold
        result.draft_vocab_size = runs[0].stats.draft_vocab_size
        if times is not None and rounds and E != AUTO and strategy == "self_speculative":
            result.predicted_speedup = cost_model.predicted_speedup(times, tokens / rounds, drafted / rounds)
    elif strategy == "early_exit" and times is not None:
        result.predicted_speedup = cost_model.predicted_early_exit_speedup(times)
    return result


def _measure_costs(engine, E, spec_runs, prompts, max_new_tokens, spec):
    """The cost model's step times at this run's typical context, mean drafts per round and draft vocabulary."""
    ks = {0}
    if spec_runs:
        rounds = sum(r.stats.rounds for r in spec_runs)
        if rounds:
            k_mean = sum(r.stats.drafted for r in spec_runs) / rounds
            ks = {math.floor(k_mean), math.ceil(k_mean)}  # t_v is interpolated between them
    context = int(sum(len(p) for p in prompts) / len(prompts)) + max_new_tokens // 2
    return cost_model.measure_step_times(engine, E, ks, context_len=context,
                                         draft_vocab=spec.draft_vocab_tensor(engine.device))


def machine_info(engine) -> dict:
    """Where the numbers were measured (a benchmark reports its machine), and the engine's matmul kernels."""
    import transformers

    model = engine.model
    info = {
        "platform": platform.platform(), "processor": cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if hasattr(os, "getloadavg"):  # other work on the machine skews absolute numbers (ratios less so)
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if model.device.type == "cpu":  # the few-row matmul kernel per bucket of row counts (kernels.tune)
        info["matmul_kernels"] = dict(zip(map(str, TUNE_ROWS), engine.kernels))
    if model.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(model.device)
    return info


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def format_table(report: BenchReport) -> str:
    """The human-readable table printed by `layerskip bench`."""
    metric_names = sorted({k for r in report.results for k in r.metrics})
    header = ["strategy", "E", "d", "tok/s", "ms/tok", "speedup", "predicted", "accept", "match"] + metric_names
    rows = [header]
    for r in report.results:
        rows.append([
            r.strategy.replace("_", "-"), _fmt(r.exit_layer), _fmt(r.num_speculations),
            _fmt(r.tokens_per_second, ".1f"), _fmt(r.ms_per_token, ".2f"), _fmt(r.speedup, ".2f", "x"),
            _fmt(r.predicted_speedup, ".2f", "x"), _fmt(r.acceptance_rate, ".2f"), _fmt(r.match_rate, ".2f"),
            *[_fmt(r.metrics.get(m), ".3f") for m in metric_names],
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = f"{report.task} · {report.num_samples} samples · {report.max_new_tokens} new tokens max · {report.model}"
    if report.batch_size > 1:
        title += f" · batch size {report.batch_size} (tok/s: total; per sequence: " + ", ".join(
            f"{r.strategy.replace('_', '-')} {r.per_sequence_tokens_per_second:.1f}" for r in report.results
            if r.per_sequence_tokens_per_second) + ")"
    for r in report.results:
        if r.choices:
            lines.append(f"{r.strategy.replace('_', '-')} chose: {r.choices}")
    for r in report.results:
        if r.compile_s is not None:
            lines.append(f"{r.strategy.replace('_', '-')}: {r.compile_s:.1f} s compiling, not in its timings")
    for r in report.results:
        if r.strategy != "self_speculative" or not (r.confidence_threshold or r.draft_vocab_size):
            continue
        lines.append(f"self-speculative drafting: confidence threshold {r.confidence_threshold or 0:g}, "
                     f"draft vocabulary {r.draft_vocab_size or 'full'}")
    return title + "\n" + "\n".join(lines)


def _fmt(value, spec: str = "", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"
