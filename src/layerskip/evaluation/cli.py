"""`layerskip bench`, `layerskip sweep`, `layerskip analyze`: parse, call the library, print.

Heavy imports (torch, transformers) happen inside the commands so that `layerskip --help` stays fast.
"""
from __future__ import annotations

import argparse

from layerskip.decoding.cli import add_drafting_args, exit_layer_arg
from layerskip.errors import LayerSkipError

TASK_HELP = "humaneval, cnn_dm, xsum, topv2, or jsonl:PATH"


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="time decoding strategies side by side on a task and score their output",
        description="Time autoregressive, early-exit and self-speculative decoding over a task's prompts "
                    "in one run (warm-up first, strategies interleaved per prompt) and score the completions.")
    _model_flags(bench)
    _task_flags(bench, default_task="humaneval")
    bench.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt at most (default 128)")
    bench.add_argument("--strategies", default="autoregressive,early-exit,self-speculative",
                       help="comma-separated; autoregressive (the baseline) is always run; self-speculative-auto: "
                            "exit layer 'auto' beside the fixed one")
    bench.add_argument("--exit-layer", type=exit_layer_arg,
                       help="E: layers used to draft / exit, or 'auto' (self-speculative chooses E and d while "
                            "decoding; early exit then needs a fixed one) (default: stored with the model, else "
                            "auto / L/2)")
    bench.add_argument("--num-speculations", type=int, help="d: drafts per round (default: stored with the "
                                                            "model, else 4)")
    add_drafting_args(bench)
    bench.add_argument("--compare-transformers", action="store_true",
                       help="also time transformers' greedy generate() and generate(assistant_early_exit=E)")
    bench.add_argument("--batch-size", type=int, default=1, metavar="B",
                       help="decode the prompts B at a time (our strategies; reports total and per-sequence tokens/s)")
    bench.add_argument("--compile", action="store_true",
                       help="also time our fixed-E strategies on the static-shape path (torch.compile, CUDA graphs on "
                            "a GPU; no confidence threshold there): rows '<strategy>-compiled', compile time apart")
    bench.add_argument("--no-metrics", action="store_true", help="skip scoring (pass@1, ROUGE, exact match)")
    bench.add_argument("--json", metavar="FILE", help="write the report as JSON")
    bench.add_argument("--choices-plot", metavar="PNG",
                       help="with exit layer 'auto' (or strategy self-speculative-auto): plot the exit layer and draft "
                            "length its rounds chose on the first timed prompt")
    bench.set_defaults(func=cmd_bench)

    sweep = subparsers.add_parser(
        "sweep", help="self-speculative speedup over a grid of exit layers and speculation counts",
        description="Measure self-speculative decoding for every (E, d) pair: a CSV row each, a speedup "
                    "heatmap, and the best pair. Rerun with the same --out to resume.")
    _model_flags(sweep)
    _task_flags(sweep, default_task="humaneval")
    sweep.add_argument("--exit-layers", required=True, help="E values: a list 2,4,6 or a range A:B:S (B included)")
    sweep.add_argument("--num-speculations", required=True, help="d values: a list or a range A:B:S")
    add_drafting_args(sweep)
    sweep.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    sweep.add_argument("--out", required=True, metavar="DIR", help="directory for sweep.csv, sweep.png, sweep.json")
    sweep.add_argument("--replay", nargs="?", const="", metavar="C,...",
                       help="predict instead of timing every cell: one greedy decode per prompt, replayed through "
                            "the rounds each (E, d) would make (exact acceptance), costed with step times measured "
                            "here; optional confidence thresholds to replay (default: --confidence-threshold). "
                            "Writes replay.csv and replay.png")
    sweep.set_defaults(func=cmd_sweep)

    analyze = subparsers.add_parser(
        "analyze", help="per-layer early-exit agreement with the final layer, and perplexity",
        description="Teacher-forced on the task's text (prompt + reference) or on --data files: for every "
                    "layer l, the exit after l layers' top-1 agreement with the final layer and its "
                    "perplexity. Writes layers.csv and layers.png.")
    _model_flags(analyze)
    source = analyze.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help=f"a task: {TASK_HELP}")
    source.add_argument("--data", nargs="+", metavar="FILE", help="text files, or JSONL with a \"text\" field")
    analyze.add_argument("--data-file", metavar="FILE", help="JSONL to use instead of the task's hub dataset")
    analyze.add_argument("--limit", type=int, help="use the first N samples / texts")
    analyze.add_argument("--max-length", type=int, default=512, help="tokens per window (default 512)")
    analyze.add_argument("--max-tokens", type=int, help="stop after about N scored tokens")
    analyze.add_argument("--compare", metavar="OTHER_MODEL", help="a second model to overlay (e.g. before training)")
    analyze.add_argument("--out", required=True, metavar="DIR", help="directory for layers.csv and layers.png")
    analyze.set_defaults(func=cmd_analyze)


def _check_drafting(args) -> None:
    """Fail fast on bad drafting options, before a model is loaded."""
    from layerskip.decoding.config import DecodeConfig

    DecodeConfig("self_speculative", confidence_threshold=args.confidence_threshold, draft_vocab=args.draft_vocab)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a checkpoint directory, hub id, or smollm2-135m (default: the built-in model)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 or auto (default: float32 on CPU)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def _task_flags(p: argparse.ArgumentParser, *, default_task: str) -> None:
    p.add_argument("--task", default=default_task, help=f"{TASK_HELP} (default {default_task})")
    p.add_argument("--data-file", metavar="FILE", help="JSONL to use instead of the task's hub dataset")
    p.add_argument("--limit", type=int, help="use the first N samples (default: all)")


def _load_model(args, spec=None):
    """(model, tokenizer, engine): loaded as the flags say, the engine's CPU matmul kernels tuned."""
    from layerskip.decoding.api import prepare
    from layerskip.models import load
    from layerskip.runtime import set_threads

    set_threads(args.threads)
    model, tokenizer = load(spec if spec is not None else args.model, dtype=args.dtype, device=args.device)
    return model, tokenizer, prepare(model, tune=True)


def _positive(value, flag):
    if value is not None and value < 1:
        raise LayerSkipError(f"{flag} must be >= 1, got {value}")


# ------------------------------------------------------------------------------------ commands


def cmd_bench(args) -> int:
    from layerskip import files as io
    from layerskip.evaluation.bench import format_table, parse_strategies, run_bench
    from layerskip.evaluation.tasks import load_task

    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.num_speculations, "--num-speculations")
    _positive(args.batch_size, "--batch-size")
    _check_drafting(args)
    strategies = parse_strategies(args.strategies)
    if args.choices_plot and args.exit_layer != "auto" and "self_speculative_auto" not in strategies:
        raise LayerSkipError("--choices-plot needs --exit-layer auto or the strategy self-speculative-auto")
    task = load_task(args.task, data_file=args.data_file, limit=args.limit)
    model, tokenizer, engine = _load_model(args)
    report = run_bench(model, tokenizer, task, strategies=strategies, exit_layer=args.exit_layer,
                       num_speculations=args.num_speculations, confidence_threshold=args.confidence_threshold,
                       draft_vocab=args.draft_vocab, max_new_tokens=args.max_new_tokens,
                       compare_transformers=args.compare_transformers, score=not args.no_metrics,
                       model_name=args.model or "default", engine=engine, batch_size=args.batch_size,
                       compile=args.compile)
    print(format_table(report))
    if args.choices_plot:
        from layerskip.evaluation.plots import plot_auto_choices

        stats = report.auto_stats()
        print(f"wrote {plot_auto_choices(stats, args.choices_plot, title=f'{report.task} · {report.model}')}")
    if args.json:
        io.write_json(args.json, report.to_dict())
        print(f"wrote {args.json}")
    return 0


def cmd_sweep(args) -> int:
    from layerskip.evaluation.sweep import parse_int_list, run_sweep
    from layerskip.evaluation.tasks import load_task

    exit_layers = parse_int_list(args.exit_layers, "--exit-layers")
    specs = parse_int_list(args.num_speculations, "--num-speculations")
    _positive(args.max_new_tokens, "--max-new-tokens")
    _check_drafting(args)
    task = load_task(args.task, data_file=args.data_file, limit=args.limit)
    if args.replay is not None:
        return _replay(args, task, exit_layers, specs)
    model, tokenizer, engine = _load_model(args)
    result = run_sweep(model, tokenizer, task, exit_layers, specs, args.out, max_new_tokens=args.max_new_tokens,
                       model_name=args.model or "default", confidence_threshold=args.confidence_threshold,
                       draft_vocab=args.draft_vocab, engine=engine)
    if result.measured < len(exit_layers) * len(specs):
        print(f"resumed: {len(exit_layers) * len(specs) - result.measured} (E, d) pairs were already in {result.csv_path}")
    cols = ["E", "d", "tok/s", "AR tok/s", "speedup", "predicted", "accept", "tok/round"]
    rows = [[str(r["exit_layer"]), str(r["num_speculations"]), _f(r["tokens_per_second"], ".1f"),
             _f(r["ar_tokens_per_second"], ".1f"), _f(r["speedup"], ".2f", "x"), _f(r["predicted_speedup"], ".2f", "x"),
             _f(r["acceptance_rate"], ".2f"), _f(r["tokens_per_round"], ".2f")] for r in result.rows]
    print(_table(cols, rows))
    best = result.best
    if best:
        print(f"best: exit_layer={best['exit_layer']} num_speculations={best['num_speculations']} "
              f"speedup={best['speedup']:.2f}x acceptance={_f(best['acceptance_rate'], '.2f')}")
    print(f"wrote {result.csv_path}, {result.png_path}, {result.json_path}")
    return 0


def _replay(args, task, exit_layers, specs) -> int:
    from pathlib import Path

    from layerskip import files as io
    from layerskip.decoding.config import DecodeConfig
    from layerskip.evaluation import plots
    from layerskip.evaluation.replay import FIELDS, replay_grid
    from layerskip.evaluation.sweep import check_grid

    thresholds = _float_list(args.replay, "--replay") if args.replay else None
    model, tokenizer, engine = _load_model(args)
    check_grid(exit_layers, specs, model.config.num_hidden_layers)
    thresholds = thresholds or [DecodeConfig("self_speculative", confidence_threshold=args.confidence_threshold)
                                .resolve(model, warn=False).confidence_threshold]
    rows = replay_grid(engine, tokenizer, task, exit_layers, specs, thresholds, max_new_tokens=args.max_new_tokens,
                       draft_vocab=args.draft_vocab)
    if not rows:
        raise LayerSkipError("no prompt produced any token to replay")
    path = Path(args.out) / "replay.csv"
    io.write_csv(path, rows, FIELDS)
    best_cells = {}
    for r in rows:  # the heatmap shows each (E, d) at its best threshold
        key = (r["exit_layer"], r["num_speculations"])
        if key not in best_cells or r["predicted_speedup"] > best_cells[key]["speedup"]:
            best_cells[key] = {"exit_layer": key[0], "num_speculations": key[1], "speedup": r["predicted_speedup"]}
    png = plots.plot_sweep_heatmap(
        list(best_cells.values()), Path(args.out) / "replay.png",
        heading="Predicted self-speculative speedup (replay)",
        title=f"{args.model or 'default'} · {task.name} · {len(task.samples)} prompts · {args.max_new_tokens} tokens"
              f" · best of confidence thresholds {', '.join(f'{c:g}' for c in thresholds)}")
    cols = ["E", "d", "C", "predicted", "flat verify", "accept", "tok/round"]
    print(_table(cols, [[str(r["exit_layer"]), str(r["num_speculations"]), f"{r['confidence_threshold']:g}",
                         _f(r["predicted_speedup"], ".2f", "x"), _f(r["flat_verify_speedup"], ".2f", "x"),
                         _f(r["acceptance_rate"], ".2f"), _f(r["tokens_per_round"], ".2f")] for r in rows]))
    best = max(rows, key=lambda r: r["predicted_speedup"])
    print(f"best (predicted): exit_layer={best['exit_layer']} num_speculations={best['num_speculations']} "
          f"confidence_threshold={best['confidence_threshold']:g} speedup={best['predicted_speedup']:.2f}x; "
          f"best with a flat verify pass (every pass priced as one position) "
          f"{max(r['flat_verify_speedup'] for r in rows):.2f}x")
    print(f"wrote {path}, {png}")
    return 0


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise LayerSkipError(f"{flag} {text!r}: expected numbers like 0,0.3,0.5") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise LayerSkipError(f"{flag} {text!r}: each threshold must be in [0, 1)")
    return values


def cmd_analyze(args) -> int:
    from layerskip.evaluation.analyze import analyze_layers, read_texts, write_analysis
    from layerskip.evaluation.tasks import load_task

    _positive(args.limit, "--limit")
    _positive(args.max_tokens, "--max-tokens")
    if args.max_length < 2:
        raise LayerSkipError(f"--max-length must be >= 2, got {args.max_length}")
    if args.task:
        texts = load_task(args.task, data_file=args.data_file, limit=args.limit).texts()
        source = args.task
    else:
        texts = read_texts(args.data)[: args.limit]
        source = ", ".join(args.data)
    results = {}
    specs = [args.model] + ([args.compare] if args.compare else [])
    labels = _labels(specs)
    for spec, label in zip(specs, labels):
        model, tokenizer, engine = _load_model(args, spec)
        results[label] = analyze_layers(engine, tokenizer, texts, max_length=args.max_length,
                                        max_tokens=args.max_tokens, progress=True)
        del model, engine
    csv_path, png_path = write_analysis(results, args.out, title=f"{' vs '.join(labels)} · {source}")
    cols = ["model", "layer", "agreement", "perplexity", "accuracy"]
    rows = [[label, str(s.layer), f"{s.agreement:.3f}", f"{s.perplexity:.2f}", f"{s.accuracy:.3f}"]
            for label, stats in results.items() for s in stats]
    print(_table(cols, rows))
    print(f"wrote {csv_path}, {png_path}")
    return 0


def _labels(specs) -> list[str]:
    labels = [s or "default" for s in specs]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]} (1)", f"{labels[1]} (2)"]
    return labels


def _f(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])
