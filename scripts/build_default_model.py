"""Build the built-in default model: a small Llama trained from scratch with LayerSkip on Python code.

Four stages, so that training can run on a GPU machine while data, tokenizer and the speed sweep stay
on the machine whose CPU the default (E, d) is chosen for:

  prepare  the training code as JSONL: the interpreter's standard library (train split, see layerskip.corpus) and
           installed third-party packages (THIRD_PARTY_TRAIN, capped per package); the held-out stdlib modules as
           JSONL and as completion prompts (for choosing (E, d, C) in `finish`), the held-out third-party
           packages as JSONL and as completion prompts (for `report`, never for choosing); a byte-level BPE
           tokenizer trained on the stdlib train split; the model config. Writes under OUT (runs/default-model).
  train    `layerskip train` twice with the same data and steps: LayerSkip (layer dropout + early-exit
           loss), and a baseline without either (last-layer loss only) for the comparison plot.
  continue (issue 23's candidates 1-4; not part of `all`, not shipped) the pretrained model continued on the standard
           library + third-party code (CONTINUE_ROUNDS, about 2 s a step on 2 cores, 2 hours in all), every exit
           learning the last layer's argmax, then rounds with a growing token-level unlikelihood term on the last
           layer against greedy loops; `finish --model OUT/continued --dest D` then sweeps and saves it
  distill  on-policy self-distillation in rounds: `layerskip selfgen` (the model's own greedy continuations of
           prompts cut from the train split), then `layerskip train --early-exit-targets final` on them
           (DISTILL_FLAGS below; CPU-sized: about 13 + 18 minutes a round on 2 cores, three rounds)
  finish   `layerskip sweep` on held-out prompts picks (E, d); they are stored in config.json under
           "layerskip", the draft vocabulary beside the weights in draft_vocab.json (layerskip.draft_vocab);
           the weights are saved in bfloat16 into src/layerskip/assets/default-model.
  report   a model's figures on the held-out third-party packages, code no stage trained or chose on:
           last-layer perplexity, 4-gram repetition of its greedy completions, self-speculative speed
           against autoregressive at its stored settings (1 and 2 threads, side by side), acceptance,
           identical output; and HumanEval pass@1. One JSON per model (--json).
  layers   a model's per-layer agreement and perplexity on the held-out stdlib modules (`layerskip analyze`,
           teacher-forced, 20,000 tokens), plotted beside the recorded curves of the two models `train` made from
           scratch on the same data: with LayerSkip and without (BASELINE_LAYERS). --json names the CSV; the PNG
           goes beside it.

    python scripts/build_default_model.py all            # everything, on this machine
    python scripts/build_default_model.py prepare        # then `train` where a GPU is, then `distill`, `finish`
    python scripts/build_default_model.py report --model src/layerskip/assets/default-model --json r.json
    python scripts/build_default_model.py layers --model runs/cand/c2-final --json docs/results/default-model/x.csv
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "src" / "layerskip" / "assets" / "default-model"

SHAPE = dict(num_hidden_layers=8, hidden_size=384, intermediate_size=768, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0)
VOCAB = 4096
# LayerSkip from scratch (paper: p_max 0.1-0.2, e_scale 0.2, rotational, exponential S(t)); with only
# 8 layers, exits rotate every 2 layers so each exit is trained every other step.
LAYERSKIP_FLAGS = ["--preset", "pretraining_from_scratch", "--rotation", "2", "--early-exit-scale", "0.5"]
BASELINE_FLAGS = ["--layer-dropout-max", "0", "--early-exit-scale", "0", "--curriculum", "none"]
# Decoding defaults chosen in `finish`: the draft vocabulary's size (the most frequent training tokens), and
# the confidence thresholds swept with (E, d).
DRAFT_VOCAB = 1024
THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7)
# held-out completion prompts, by prompt shape: `finish` picks the cell best on both (geometric mean) on the stdlib
# modules' prompts; `report` measures on the third-party packages' prompts, which no choice has seen
HELDOUT_PROMPTS = {"def": "heldout_prompts.jsonl", "docstring": "heldout_docstring_prompts.jsonl"}
REPORT_PROMPTS = {"def": "report_def_prompts.jsonl", "docstring": "report_docstring_prompts.jsonl"}
THIRD_PARTY_CAP = 1_000_000  # characters per third-party package in train.jsonl (files spread over the package)
# `train`'s two models from scratch, analysed on OUT/heldout.jsonl (20,000 tokens); the weights are not kept
BASELINE_LAYERS = ROOT / "docs" / "results" / "default-model" / "layers_layerskip_vs_baseline.csv"
BASELINE_LABELS = {"runs/default-model/layerskip": "from scratch, LayerSkip (train stage)",
                   "runs/default-model/baseline": "from scratch, no LayerSkip (baseline)"}
TRAIN_FLAGS = ["--seq-len", "512", "--lr", "1e-3", "--warmup-steps", "100", "--weight-decay", "0.1",
               "--eval-fraction", "0.02"]


def sh(*cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def prepare(out: Path) -> None:
    from transformers import LlamaConfig

    from layerskip.corpus import read_texts, round_robin, stdlib_files, third_party_files
    from layerskip.tokenizer import train_bpe_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    train_files, heldout_files = stdlib_files("train"), stdlib_files("heldout")
    third_train, third_heldout = third_party_files("train", max_chars_per_package=THIRD_PARTY_CAP), third_party_files("heldout")
    for name, files in (("train.jsonl", train_files + third_train), ("heldout.jsonl", heldout_files),
                        ("heldout_thirdparty.jsonl", round_robin(third_heldout))):
        with open(out / name, "w") as f:
            for text in read_texts(files):
                f.write(json.dumps({"text": text}) + "\n")
    tokenizer = train_bpe_tokenizer(train_files, VOCAB, out / "tokenizer", model_max_length=SHAPE["max_position_embeddings"])
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    config.save_pretrained(out / "init")
    for shape in HELDOUT_PROMPTS:
        heldout_prompts(heldout_files, shape, out / HELDOUT_PROMPTS[shape])
        heldout_prompts(round_robin(third_heldout), shape, out / REPORT_PROMPTS[shape])
    print(f"prepared {out}: {len(train_files)} + {len(third_train)} third-party train files, {len(heldout_files)} + "
          f"{len(third_heldout)} held-out files, vocab {len(tokenizer)}")


def heldout_prompts(files, shape: str, path: Path) -> None:
    """Completion prompts of `shape` (layerskip.training.selfgen.SHAPES) from held-out code, the rest as reference."""
    from layerskip.corpus import read_texts
    from layerskip.training.selfgen import context_prompts

    per_file = []
    for text in read_texts(files):
        per_file.append([{"prompt": prompt, "reference": text[end:end + 400]}
                         for prompt, end in context_prompts(text, shape=shape)[:4]])
    with open(path, "w") as f:
        for i in range(4):  # round-robin over files, so the first N prompts come from many modules
            for rows in per_file:
                if i < len(rows):
                    f.write(json.dumps(rows[i]) + "\n")


def train(out: Path, steps: int, batch_size: int, dtype: str, which: list[str]) -> None:
    runs = {"layerskip": LAYERSKIP_FLAGS, "baseline": BASELINE_FLAGS}
    procs = []
    for name in which:
        cmd = [sys.executable, "-m", "layerskip", "train", "--init", out / "init", "--tokenizer", out / "tokenizer",
               "--data", out / "train.jsonl", "--output-dir", out / name, "--max-steps", str(steps),
               "--batch-size", str(batch_size), "--dtype", dtype, "--save-steps", str(steps), *TRAIN_FLAGS,
               *runs[name]]
        print("+", " ".join(map(str, cmd)), flush=True)
        log = open(out / f"{name}.log", "w")
        procs.append((name, subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)))
    failed = [name for name, p in procs if p.wait() != 0]
    if failed:
        raise SystemExit(f"training failed: {failed}; see {out}/<name>.log")


# On-policy self-distillation (`distill`), in rounds, each from the previous round's model: `layerskip selfgen`
# (the model's greedy continuations of 4000 prompts cut from the train split), then `layerskip train` on them with
# every exit distilled from the last layer and the weight on the exits a drafter uses (after 2 to 4 layers).
# Round 1 cuts `def` prompts (a def line and two more); the later rounds cut `docstring` prompts (a def line and its
# docstring, a HumanEval prompt's shape), each with a fresh shuffle, and mix in a different 2000 of round 1's texts.
# (A second `def` round, with a third of the train split as real code, moved neither the exits nor the perplexity.)
DISTILL_FLAGS = ["--max-steps", "300", "--batch-size", "8", "--seq-len", "512", "--lr", "1e-4", "--warmup-steps", "20",
                 "--layer-dropout-max", "0", "--curriculum", "none", "--early-exit-targets", "final",
                 "--early-exit-weights", "0,1,2,2,1,0.5,0.5,3", "--save-steps", "100", "--eval-fraction", "0.02"]
DISTILL_PROMPTS, DISTILL_NEW_TOKENS = 4000, 128
DOCSTRING_ROUNDS, MIX_ROUND1 = 2, 2000  # docstring rounds after round 1; round 1 texts mixed into each


def distill(out: Path, dtype: str) -> None:
    """On-policy self-distillation of out/layerskip into out/distilled (rounds: out/distilled-1, -2, ...)."""
    def selfgen(model: Path, data: Path, *extra) -> None:
        sh(sys.executable, "-m", "layerskip", "selfgen", "--model", model, "--data", out / "train.jsonl",
           "--limit", DISTILL_PROMPTS, "--max-new-tokens", DISTILL_NEW_TOKENS, "--batch-size", 48, "--out", data, *extra)

    def train_round(model: Path, data: Path, n: int) -> Path:
        sh(sys.executable, "-m", "layerskip", "train", "--model", model, "--data", data,
           "--output-dir", out / f"distilled-{n}", "--dtype", dtype, *DISTILL_FLAGS)
        return out / f"distilled-{n}"

    round1 = out / "selfgen.jsonl"
    selfgen(out / "layerskip", round1)
    model = train_round(out / "layerskip", round1, 1)
    first = round1.read_text().splitlines(keepends=True)
    for n in range(2, 2 + DOCSTRING_ROUNDS):
        data = out / f"selfgen-docstring-{n}.jsonl"
        selfgen(model, data, "--prompt-shape", "docstring", "--seed", n - 2)
        mix = out / f"distill-{n}.jsonl"
        mix.write_text(data.read_text() + "".join(first[(n - 2) * MIX_ROUND1:(n - 1) * MIX_ROUND1]))
        model = train_round(model, mix, n)
    publish(model, out / "distilled")


def publish(model: Path, dest: Path) -> None:
    """The last round's model, without its intermediate checkpoints, as `dest` (replacing it)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("checkpoint-*"))


# `continue`: rounds of `layerskip train`, each from the previous round's model, on OUT/train.jsonl (8 x 512 tokens a
# step, bf16 autocast, cosine, 30 warm-up steps, weight decay 0.1, layer dropout 0.1, every exit on and learning the
# last layer's argmax, most weight on the exits after 2 to 4 layers). Per round: steps, lr, unlikelihood alpha, seed,
# eval fraction (as candidates 1-4 in docs/default_model.md were made; none of them is shipped).
CONTINUE_FLAGS = ["--batch-size", "8", "--seq-len", "512", "--lr-scheduler", "cosine", "--warmup-steps", "30",
                  "--weight-decay", "0.1", "--layer-dropout-max", "0.1", "--early-exit-scale", "0.2",
                  "--early-exit-weights", "0,1,2,2,1,0.5,0.5,3", "--early-exit-targets", "final", "--curriculum", "none"]
CONTINUE_ROUNDS = [(600, 3e-4, 0.0, 0, 0.01), (1000, 2e-4, 1.0, 1, 0.01), (1000, 2e-4, 2.0, 2, 0.05),
                   (1000, 2e-4, 3.0, 3, 0.05)]


def continue_training(out: Path, dtype: str) -> None:
    """out/layerskip continued through CONTINUE_ROUNDS into out/continued (rounds: out/continued-1, -2, ...)."""
    model = out / "layerskip"
    for n, (steps, lr, alpha, seed, eval_fraction) in enumerate(CONTINUE_ROUNDS, 1):
        sh(sys.executable, "-m", "layerskip", "train", "--model", model, "--data", out / "train.jsonl",
           "--output-dir", out / f"continued-{n}", "--dtype", dtype, "--max-steps", steps, "--lr", lr,
           "--unlikelihood", alpha, "--seed", seed, "--eval-fraction", eval_fraction, *CONTINUE_FLAGS)
        model = out / f"continued-{n}"
    publish(model, out / "continued")


def finish(out: Path, limit: int, source: Path | None = None, dest: Path = ASSET) -> None:
    """Sweep (E, d, C) for `source` (default: out/distilled, else out/layerskip) and save it, bf16, into `dest`."""

    import torch

    from layerskip import draft_vocab as draft_vocabulary
    from layerskip import files
    from layerskip.models import load
    from layerskip.training.trainer import rank_draft_vocab

    if source is None:
        source = out / "distilled" if (out / "distilled").exists() else out / "layerskip"
    model, tokenizer = load(str(source))
    # the draft vocabulary: the training data's most frequent tokens (`layerskip train` stores them in
    # draft_vocab.json, which `load` attaches; a model trained before it did gets them here, from the same data)
    ranked = getattr(model, "draft_vocab_ids", None)
    if not ranked:
        texts = [json.loads(line)["text"] for line in open(out / "train.jsonl")]
        ids = torch.tensor([i for e in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in e])
        ranked = rank_draft_vocab(ids, model.config.vocab_size)
    draft_vocab = ranked[:DRAFT_VOCAB]
    if hasattr(model.config, "layerskip"):  # no stored (E, d, C) while sweeping for them
        del model.config.layerskip
    tmp_model = out / "layerskip-draft"
    model.save_pretrained(tmp_model)
    tokenizer.save_pretrained(tmp_model)
    draft_vocabulary.write(tmp_model, draft_vocab)
    # (E, d, C) by replaying the model's own greedy decodes of held-out prompts through every cell's rounds, costed
    # with step times measured here (`layerskip sweep --replay`), for each prompt shape; the cell with the best
    # geometric mean of the predicted speedups wins
    scores: dict[tuple, list[float]] = {}
    for shape, name in HELDOUT_PROMPTS.items():
        sweep = out / f"sweep-replay-{shape}"
        sh(sys.executable, "-m", "layerskip", "sweep", "--model", tmp_model, "--task", f"jsonl:{out / name}",
           "--limit", str(limit), "--exit-layers", "2:7:1", "--num-speculations", "2,3,4,6,8",
           "--replay", ",".join(f"{t:g}" for t in THRESHOLDS), "--max-new-tokens", "128", "--threads", "1",
           "--out", sweep)
        for r in files.read_csv(sweep / "replay.csv"):
            cell = (int(r["exit_layer"]), int(r["num_speculations"]), float(r["confidence_threshold"]))
            scores.setdefault(cell, []).append(float(r["predicted_speedup"]))
    cells = {cell: math.prod(v) ** (1 / len(v)) for cell, v in scores.items() if len(v) == len(HELDOUT_PROMPTS)}
    (E, d, C), speedup = max(cells.items(), key=lambda kv: kv[1])
    best = {"exit_layer": E, "num_speculations": d, "confidence_threshold": C, "speedup": speedup}
    model.config.layerskip = {"trained": True, "exit_layer": int(best["exit_layer"]),
                              "num_speculations": int(best["num_speculations"]),
                              "confidence_threshold": best["confidence_threshold"],
                              "recipe": "scripts/build_default_model.py (see docs/default_model.md)"}
    with files.atomic_dir(dest) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        draft_vocabulary.write(tmp, draft_vocab)
    shutil.rmtree(tmp_model, ignore_errors=True)
    print(f"default model written to {dest}: E={best['exit_layer']} d={best['num_speculations']} "
          f"confidence threshold {best['confidence_threshold']:g}, draft vocabulary {len(draft_vocab)}: "
          f"speedup {float(best['speedup']):.2f}x")


REPORT_TOKENS = 40_000  # teacher-forced positions of held-out third-party code for the perplexity
REPORT_LIMIT = 24  # prompts of each shape


def report(out: Path, model_dir: str, threads: list[int], humaneval: bool) -> dict:
    """A model's figures on the held-out third-party packages (see the module doc)."""
    import layerskip
    from layerskip.evaluation.analyze import analyze_layers
    from layerskip.decoding.result import ngram_repetition
    from layerskip.evaluation.bench import run_bench
    from layerskip.evaluation.tasks import load_task
    from layerskip.runtime import set_threads

    model, tokenizer = layerskip.load(model_dir)
    model.float()  # fp32: lossless means token-identical there
    texts = [json.loads(line)["text"] for line in open(out / "heldout_thirdparty.jsonl")]
    set_threads(max(threads))
    layers = analyze_layers(model, tokenizer, texts, max_tokens=REPORT_TOKENS, progress=True)
    result = {"model": str(model_dir), "stored": getattr(model.config, "layerskip", None),
              "perplexity": layers[-1].perplexity, "perplexity_tokens": layers[-1].num_tokens,
              "agreement_by_exit": [round(s.agreement, 4) for s in layers],
              "perplexity_by_exit": [round(s.perplexity, 2) for s in layers], "prompts": {}}
    engine = layerskip.prepare(model, tune=True)
    for shape, name in REPORT_PROMPTS.items():
        task = load_task(f"jsonl:{out / name}", limit=REPORT_LIMIT)
        # the same figure for the code that really follows each prompt (its first 400 characters, up to 128 tokens):
        # what a model that writes code rather than loops comes near
        refs = [ngram_repetition(tokenizer(s.reference, add_special_tokens=False)["input_ids"][:128])
                for s in task.samples]
        refs = [r for r in refs if r is not None]
        result.setdefault("reference_repetition", {})[shape] = sum(refs) / len(refs)
        for t in threads:  # side by side: both strategies in one run, the order rotated per prompt
            set_threads(t)
            bench = run_bench(model, tokenizer, task, strategies=["autoregressive", "self_speculative"],
                              max_new_tokens=128, score=False, predict=False, engine=engine, model_name=str(model_dir))
            ar, ss = bench.result("autoregressive"), bench.result("self_speculative")
            per_prompt = [{"prompt": sample.prompt, "speedup": a.total_s / b.total_s if b.total_s else None,
                           "repetition": ngram_repetition(ids)}
                          for sample, a, b, ids in zip(task.samples, bench.stats["autoregressive"],
                                                       bench.stats["self_speculative"], bench.token_ids["autoregressive"])]
            result["prompts"][f"{shape}_{t}thread"] = {
                "autoregressive_tokens_per_second": ar.tokens_per_second,
                "self_speculative_tokens_per_second": ss.tokens_per_second, "speedup": ss.speedup,
                "acceptance_rate": ss.acceptance_rate, "identical": ss.match_rate == 1.0,
                "repetition": ar.metrics["repetition"], "settings": {
                    "exit_layer": ss.exit_layer, "num_speculations": ss.num_speculations,
                    "confidence_threshold": ss.confidence_threshold}, "per_prompt": per_prompt}
            print(f"{shape}, {t} thread(s): {ss.speedup:.2f}x, acceptance {ss.acceptance_rate:.2f}, "
                  f"identical {ss.match_rate == 1.0}, repetition {ar.metrics['repetition']:.2f}", flush=True)
    if humaneval:
        set_threads(max(threads))
        bench = run_bench(model, tokenizer, load_task("humaneval"), strategies=["autoregressive"],
                          max_new_tokens=128, predict=False, engine=engine, batch_size=8, warmup=False)
        ar = bench.result("autoregressive")
        result["humaneval"] = {"pass@1": ar.metrics.get("pass@1"), "repetition": ar.metrics["repetition"]}
    shapes = result["prompts"].values()
    print(f"{model_dir}: perplexity {result['perplexity']:.1f}, repetition "
          f"{sum(r['repetition'] for r in shapes) / len(shapes):.2f}, speedup "
          + ", ".join(f"{k} {r['speedup']:.2f}x" for k, r in result["prompts"].items())
          + (f", HumanEval pass@1 {result['humaneval']['pass@1']}" if humaneval else ""))
    result["typical_prompt"] = typical_prompt(result["prompts"][f"docstring_{min(threads)}thread"]["per_prompt"])
    print("typical docstring prompt (median speedup and repetition):\n" + result["typical_prompt"])
    return result


def layers(out: Path, model_dir: str, csv_path: Path) -> None:
    """The model's per-layer curve beside the recorded from-scratch LayerSkip and baseline curves: csv_path and its
    PNG."""
    from layerskip import files
    from layerskip.evaluation import plots
    from layerskip.evaluation.analyze import FIELDS

    scratch = out / "layers-analyze"
    sh(sys.executable, "-m", "layerskip", "analyze", "--model", model_dir, "--data", out / "heldout.jsonl",
       "--max-tokens", "20000", "--threads", "2", "--out", scratch)
    rows = [{**r, "model": BASELINE_LABELS.get(r["model"], r["model"])} for r in files.read_csv(BASELINE_LAYERS)]
    rows += [{**r, "model": model_dir} for r in files.read_csv(scratch / "layers.csv")]
    curves: dict[str, list[dict]] = {}
    for r in rows:
        curves.setdefault(r["model"], []).append(r)
    files.write_csv(csv_path, rows, FIELDS)
    plots.plot_layer_analysis(curves, csv_path.with_suffix(".png"),
                              title="held-out standard-library modules, teacher-forced, 20,000 tokens")
    for label, rs in curves.items():
        print(label, " ".join(f"{float(r['agreement']):.2f}" for r in rs), f"ppl {float(rs[-1]['perplexity']):.1f}")


def typical_prompt(per_prompt: list[dict]) -> str:
    """The prompt nearest the median on both speedup and repetition (sum of the distances of its ranks from the
    middle rank): what `make demo` shows, so that the demo is neither the fastest case nor the least repetitive."""
    rows = [r for r in per_prompt if r["speedup"] is not None and r["repetition"] is not None]
    mid = (len(rows) - 1) / 2
    rank = {key: {id(r): i for i, r in enumerate(sorted(rows, key=lambda r: r[key]))} for key in ("speedup", "repetition")}
    return min(rows, key=lambda r: abs(rank["speedup"][id(r)] - mid) + abs(rank["repetition"][id(r)] - mid))["prompt"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["prepare", "train", "continue", "distill", "finish", "all", "report", "layers"])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "default-model")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--runs", default="layerskip,baseline")
    p.add_argument("--sweep-limit", type=int, default=24)
    p.add_argument("--model", help="report, layers: the model to measure (default: the built-in one); finish: the model to "
                   "sweep and save (default: OUT/distilled, else OUT/layerskip)")
    p.add_argument("--dest", type=Path, default=ASSET, help="finish: where to save the model (default: the package)")
    p.add_argument("--threads", default="1,2", help="report: thread counts to time with")
    p.add_argument("--no-humaneval", action="store_true", help="report: skip HumanEval pass@1")
    p.add_argument("--json", type=Path, help="report: where to write the figures; layers: the CSV to write")
    p.add_argument("--demo-prompt", type=Path, help="report: write the typical prompt there (what `make demo` "
                   "shows is src/layerskip/assets/demo_prompt.txt, layerskip.decoding.cli.DEMO_PROMPT_FILE)")
    args = p.parse_args()
    if args.stage == "report":
        from layerskip.files import write_json, write_text

        figures = report(args.out, args.model or str(ASSET), [int(t) for t in args.threads.split(",")], not args.no_humaneval)
        if args.json:
            write_json(args.json, figures)
        if args.demo_prompt:
            write_text(args.demo_prompt, figures["typical_prompt"])
        return
    if args.stage == "layers":
        if not args.json:
            sys.exit("layers: --json CSV is required (the plot goes beside it)")
        layers(args.out, args.model or str(ASSET), args.json)
        return
    if args.stage in ("prepare", "all"):
        prepare(args.out)
    if args.stage in ("train", "all"):
        train(args.out, args.steps, args.batch_size, args.dtype, args.runs.split(","))
    if args.stage == "continue":
        continue_training(args.out, args.dtype)
    if args.stage in ("distill", "all"):
        distill(args.out, args.dtype)
    if args.stage in ("finish", "all"):
        finish(args.out, args.sweep_limit, Path(args.model) if args.model else None, args.dest)


if __name__ == "__main__":
    main()
