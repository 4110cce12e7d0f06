"""`layerskip generate` and `layerskip demo`: parse, call the library, print."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layerskip.decoding.stopping import TextStream
from layerskip.errors import LayerSkipError

# `layerskip demo`'s prompt: held-out code (a package the built-in model never trained on) where the built-in model
# is typical, its speedup and its repetition both nearest the median over the report's prompts
# (scripts/build_default_model.py report --demo-prompt; docs/default_model.md)
DEMO_PROMPT_FILE = Path(__file__).resolve().parents[1] / "assets" / "demo_prompt.txt"
DEMO_PROMPT_LINES = 12  # of a longer prompt, the demo prints the last ones


def add_model_args(p: argparse.ArgumentParser,
                   threads_help: str = "torch CPU threads (default: torch's choice)") -> None:
    p.add_argument("--model", default=None,
                   help="a local checkpoint directory, a hub id, 'smollm2-135m', or omit for the built-in default")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16, auto")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help=threads_help)


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="autoregressive",
                   help="autoregressive | early-exit | self-speculative (default: autoregressive)")
    p.add_argument("--exit-layer", type=exit_layer_arg, default=None,
                   help="E: exit after the first E layers (1 <= E < L); self-speculative: 'auto' chooses E and d "
                        "while decoding (the default where the model stores no E)")
    p.add_argument("--num-speculations", type=int, default=None, help="d: tokens drafted per round")
    add_drafting_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --sample: > 0 (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="with --sample: keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="with --sample: nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="with --sample: a reproducible stream")
    p.add_argument("--stop", action="append", default=None, metavar="STRING", type=_unescape,
                   help="stop string (repeatable; \\n and \\t are read as newline and tab); the output is cut before it")
    add_compile_arg(p)


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="the static-shape path: each round one fixed-shape function through torch.compile (and a CUDA "
                        "graph on a GPU); greedy, a fixed exit layer, no confidence threshold; compile time is "
                        "reported apart")


def exit_layer_arg(text: str):
    """--exit-layer: an integer, or 'auto' (self-speculative decoding chooses E and d as it goes)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def add_drafting_args(p: argparse.ArgumentParser) -> None:
    """Self-speculative drafting options (lossless either way; defaults: the values stored with the model)."""
    p.add_argument("--confidence-threshold", type=float, default=None, metavar="C",
                   help="stop a round's drafting where the draft distribution's top probability is below C "
                        "(adaptive draft length; 0 = always draft d)")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="draft over the N most frequent tokens of the model's training data (stored by "
                        "`layerskip train`); 0 = the full vocabulary")


def _unescape(text: str) -> str:
    """Shell-friendly stop strings: a typed backslash-n is a newline, backslash-t a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with a LayerSkip decoding strategy",
                              description="Generate a completion; prints the text, then a stats line.")
    add_model_args(p)
    p.add_argument("--prompt", default=None, help="the prompt (default: read standard input)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="many prompts: JSONL, one {\"prompt\": ...} per line, decoded --batch-size at a time")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="with --prompts: write one JSON result per line here (atomically); default: standard output")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="with --prompts: prompts decoded together (default 8)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_decoding_args(p)
    p.add_argument("--stream", action="store_true", help="print text as it is accepted")
    p.set_defaults(func=run_generate)

    d = subparsers.add_parser("demo", help="the built-in model: autoregressive vs self-speculative, side by side")
    add_model_args(d)
    d.add_argument("--prompt", default=None, help="default: a held-out code prompt where the built-in model is "
                   "typical (neither its fastest nor its least repetitive)")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--repeats", type=int, default=3, help="alternating runs per strategy; the fastest counts")
    d.set_defaults(func=run_demo)


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise LayerSkipError("no prompt: pass --prompt TEXT or pipe text on standard input")
    try:
        text = sys.stdin.buffer.read().decode("utf-8") if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    except UnicodeDecodeError as e:
        raise LayerSkipError(f"standard input is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text:
        raise LayerSkipError("no prompt: standard input was empty")
    return text


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    if tokenizer is None:
        raise LayerSkipError("this checkpoint has no tokenizer; use the Python API with token ids")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LayerSkipError("--chat: this tokenizer has no chat template")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer(prompt).input_ids


def stats_line(stats) -> str:
    parts = [f"{stats.strategy.replace('_', '-')}", f"{stats.num_new_tokens} tokens",
             f"{stats.tokens_per_second:.1f} tokens/s"]
    if stats.exit_layer is not None:
        parts.append(f"exit layer {stats.exit_layer}")
    if stats.compile_s is not None:
        parts.append(f"compiled ({stats.compile_s:.1f} s compiling, not counted)" if stats.compile_s else "compiled")
    if stats.strategy == "self_speculative":
        rate = "-" if stats.acceptance_rate is None else f"{stats.acceptance_rate:.2f}"
        per_round = "-" if stats.tokens_per_round is None else f"{stats.tokens_per_round:.2f}"
        acceptance = f"acceptance {rate}, {per_round} tokens/round"
        if stats.exit_layer == "auto":
            from layerskip.decoding.auto import summary

            parts += [f"chose {summary(stats.exit_layer_per_round, stats.speculations_per_round)}", acceptance]
        else:
            parts.append(f"d={stats.num_speculations}, {acceptance}")
        if stats.confidence_threshold:
            parts.append(f"confidence threshold {stats.confidence_threshold:g}")
        if stats.draft_vocab_size:
            parts.append(f"draft vocabulary {stats.draft_vocab_size}")
    return "[" + " | ".join(parts) + "]"


class TextPrinter:
    """Prints decoded text as tokens arrive, holding back what could still turn into a stop string."""

    def __init__(self, tokenizer, stop_strings=None, out=None):
        self.stream, self.out = TextStream(tokenizer, stop_strings), out or sys.stdout

    def __call__(self, ids: list[int]) -> None:
        self._write(self.stream.feed(ids))

    def finish(self, final_text: str) -> None:
        self._write(self.stream.finish(final_text))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


def decode_config(args, **overrides):
    """The DecodeConfig of the decoding flags (validated here, before any model is loaded)."""
    from layerskip.decoding.config import DecodeConfig

    fields = dict(strategy=args.strategy, exit_layer=args.exit_layer, num_speculations=args.num_speculations,
                  confidence_threshold=args.confidence_threshold, draft_vocab=args.draft_vocab,
                  max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop or ()),
                  compile=args.compile)
    fields.update(overrides)
    return DecodeConfig(**fields)


def load_engine(args):
    """(model, tokenizer, engine): the model loaded as the flags say, its CPU matmul kernels tuned."""
    from layerskip.decoding.api import prepare
    from layerskip.models import load
    from layerskip.runtime import set_threads

    set_threads(args.threads)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    return model, tokenizer, prepare(model, tune=True)


def run_generate(args) -> int:
    from layerskip.decoding.api import generate
    from layerskip.runtime import set_threads

    set_threads(args.threads)
    config = decode_config(args)  # fail fast, before loading a model
    if args.prompts is not None:
        return _run_many(args, config)
    for flag, value in (("--out", args.out), ("--batch-size", args.batch_size)):
        if value is not None:
            raise LayerSkipError(f"{flag} goes with --prompts FILE")
    prompt = _read_prompt(args)
    model, tokenizer, engine = load_engine(args)
    ids = encode_prompt(tokenizer, prompt, args.chat)
    printer = TextPrinter(tokenizer, config.stop_strings) if args.stream else None
    result = generate(engine, ids, config, tokenizer=tokenizer, streamer=printer)
    if printer:
        printer.finish(result.text)
    else:
        print(result.text)
    print(stats_line(result.stats), file=sys.stderr)
    return 0


def read_prompts(path) -> list[str]:
    """The "prompt" strings of a JSONL file, in order (one clear error per bad line)."""
    from layerskip.jsonl import iter_objects

    prompts = []
    for lineno, row in iter_objects(path):
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise LayerSkipError(f"{path}, line {lineno}: needs a non-empty \"prompt\" string")
        prompts.append(row["prompt"])
    if not prompts:
        raise LayerSkipError(f"{path}: no prompts")
    return prompts


def _run_many(args, config) -> int:
    """--prompts FILE: decode B at a time, one JSON line per prompt (to --out, atomically, or stdout)."""
    import json

    from layerskip.decoding.api import generate
    from layerskip.files import write_text

    if args.prompt is not None or args.stream:
        raise LayerSkipError("--prompts reads its prompts from the file; drop --prompt / --stream")
    batch = 8 if args.batch_size is None else args.batch_size
    if batch < 1:
        raise LayerSkipError(f"--batch-size must be >= 1, got {batch}")
    texts = read_prompts(args.prompts)
    model, tokenizer, engine = load_engine(args)
    ids = [encode_prompt(tokenizer, t, args.chat) for t in texts]
    lines, tokens, seconds = [], 0, 0.0
    for start in range(0, len(ids), batch):
        for i, r in enumerate(generate(engine, ids[start:start + batch], config, tokenizer=tokenizer)):
            lines.append(json.dumps({"index": start + i, "prompt": texts[start + i], "text": r.text,
                                     "token_ids": r.token_ids, "stats": r.stats.as_dict()}))
            tokens += r.stats.num_new_tokens
        seconds += r.stats.total_s
    body = "\n".join(lines) + "\n"
    if args.out:
        write_text(args.out, body)
    else:
        sys.stdout.write(body)
    print(f"[{len(texts)} prompts, batch size {batch} | {tokens} tokens | "
          f"{tokens / seconds if seconds else 0:.1f} tokens/s in all]", file=sys.stderr)
    return 0


def run_demo(args) -> int:
    from layerskip.decoding.api import generate
    from layerskip.decoding.result import ngram_repetition
    if args.repeats < 1:
        raise LayerSkipError(f"--repeats must be >= 1, got {args.repeats}")
    model, tokenizer, engine = load_engine(args)
    L = model.config.num_hidden_layers
    print(f"model: {model.config.name_or_path} ({type(model).__name__}, {L} layers)")
    prompt = DEMO_PROMPT_FILE.read_text() if args.prompt is None else args.prompt
    ids = encode_prompt(tokenizer, prompt)
    room = getattr(model.config, "max_position_embeddings", None)
    if args.prompt is None and room and len(ids) + args.max_new_tokens > room:
        ids = ids[-max(1, room - args.max_new_tokens):]  # the default prompt's end, for a model with fewer positions
    generate(engine, ids, max_new_tokens=8)  # warm-up
    # Alternate the strategies and keep each one's fastest run: a job that briefly takes a core can
    # stall a run many times over on a small machine, and the minimum is what the code can do.
    runs = {}
    for _ in range(args.repeats):
        for strategy in ("autoregressive", "self_speculative"):
            r = generate(engine, ids, strategy=strategy, max_new_tokens=args.max_new_tokens, tokenizer=tokenizer)
            if strategy not in runs or r.stats.total_s < runs[strategy].stats.total_s:
                runs[strategy] = r
    ar, ss = runs["autoregressive"], runs["self_speculative"]
    print("---- prompt + greedy completion " + "-" * 40)
    lines = prompt.splitlines(keepends=True)
    if len(lines) > DEMO_PROMPT_LINES:
        print(f"[... {len(lines) - DEMO_PROMPT_LINES} earlier lines of the prompt]")
    print("".join(lines[-DEMO_PROMPT_LINES:]) + ss.text)
    print("-" * 71)
    for r in (ar, ss):
        print(stats_line(r.stats))
    same = "identical" if ar.token_ids == ss.token_ids else "DIFFERENT"
    speedup = ss.stats.tokens_per_second / ar.stats.tokens_per_second if ar.stats.tokens_per_second else 0.0
    print(f"self-speculative vs autoregressive: {speedup:.2f}x (fastest of {args.repeats} alternating runs each), "
          f"output {same}")
    rep = ngram_repetition(ss.token_ids)
    print(f"4-gram repetition of the completion: {'-' if rep is None else f'{rep:.2f}'} "
          "(1 - distinct 4-grams / 4-grams of its token ids; 0 = nothing repeats)")
    return 0 if ar.token_ids == ss.token_ids else 1
