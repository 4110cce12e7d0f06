"""Build the built-in default model: a small Llama trained from scratch with LayerSkip on Python code.

Four stages, so that training can run on a GPU machine while data, tokenizer and the speed sweep stay
on the machine whose CPU the default (E, d) is chosen for:

  prepare  the interpreter's standard library (train split, see layerskip.corpus) as JSONL; the
           held-out modules as JSONL and as completion prompts; a byte-level BPE tokenizer trained on
           the train split; the model config. Writes under OUT (default runs/default-model).
  train    `layerskip train` twice with the same data and steps: LayerSkip (layer dropout + early-exit
           loss), and a baseline without either (last-layer loss only) for the comparison plot.
  distill  on-policy self-distillation in rounds: `layerskip selfgen` (the model's own greedy continuations of
           prompts cut from the train split), then `layerskip train --early-exit-targets final` on them
           (DISTILL_FLAGS below; CPU-sized: about 13 + 18 minutes a round on 2 cores, three rounds)
  finish   `layerskip sweep` on held-out prompts picks (E, d); they are stored in config.json under
           "layerskip", the draft vocabulary beside the weights in draft_vocab.json (layerskip.draft_vocab);
           the weights are saved in bfloat16 into src/layerskip/assets/default-model.

    python scripts/build_default_model.py all            # everything, on this machine
    python scripts/build_default_model.py prepare        # then `train` where a GPU is, then `distill`, `finish`
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
# held-out completion prompts, by prompt shape: `finish` picks the cell best on both (geometric mean)
HELDOUT_PROMPTS = {"def": "heldout_prompts.jsonl", "docstring": "heldout_docstring_prompts.jsonl"}
TRAIN_FLAGS = ["--seq-len", "512", "--lr", "1e-3", "--warmup-steps", "100", "--weight-decay", "0.1",
               "--eval-fraction", "0.02"]


def sh(*cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def prepare(out: Path) -> None:
    from transformers import LlamaConfig

    from layerskip.corpus import read_texts, stdlib_files
    from layerskip.tokenizer import train_bpe_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    train_files, heldout_files = stdlib_files("train"), stdlib_files("heldout")
    for name, files in (("train.jsonl", train_files), ("heldout.jsonl", heldout_files)):
        with open(out / name, "w") as f:
            for text in read_texts(files):
                f.write(json.dumps({"text": text}) + "\n")
    tokenizer = train_bpe_tokenizer(train_files, VOCAB, out / "tokenizer", model_max_length=SHAPE["max_position_embeddings"])
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    config.save_pretrained(out / "init")
    for shape, name in HELDOUT_PROMPTS.items():
        heldout_prompts(heldout_files, shape, out / name)
    print(f"prepared {out}: {len(train_files)} train files, {len(heldout_files)} held-out files, vocab {len(tokenizer)}")


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
    shutil.rmtree(out / "distilled", ignore_errors=True)
    shutil.copytree(model, out / "distilled", ignore=shutil.ignore_patterns("checkpoint-*"))


def finish(out: Path, limit: int) -> None:
    import json

    import torch

    from layerskip import draft_vocab as draft_vocabulary
    from layerskip.files import atomic_dir
    from layerskip.models import load
    from layerskip.training.trainer import rank_draft_vocab

    model_dir = out / "distilled"
    model, tokenizer = load(str(model_dir if model_dir.exists() else out / "layerskip"))
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
        for r in csv_rows(sweep / "replay.csv"):
            cell = (int(r["exit_layer"]), int(r["num_speculations"]), float(r["confidence_threshold"]))
            scores.setdefault(cell, []).append(float(r["predicted_speedup"]))
    cells = {cell: math.prod(v) ** (1 / len(v)) for cell, v in scores.items() if len(v) == len(HELDOUT_PROMPTS)}
    (E, d, C), speedup = max(cells.items(), key=lambda kv: kv[1])
    best = {"exit_layer": E, "num_speculations": d, "confidence_threshold": C, "speedup": speedup}
    model.config.layerskip = {"trained": True, "exit_layer": int(best["exit_layer"]),
                              "num_speculations": int(best["num_speculations"]),
                              "confidence_threshold": best["confidence_threshold"],
                              "recipe": "scripts/build_default_model.py (see docs/default_model.md)"}
    with atomic_dir(ASSET) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        draft_vocabulary.write(tmp, draft_vocab)
    shutil.rmtree(tmp_model, ignore_errors=True)
    print(f"default model written to {ASSET}: E={best['exit_layer']} d={best['num_speculations']} "
          f"confidence threshold {best['confidence_threshold']:g}, draft vocabulary {len(draft_vocab)}: "
          f"speedup {float(best['speedup']):.2f}x")


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["prepare", "train", "distill", "finish", "all"])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "default-model")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--runs", default="layerskip,baseline")
    p.add_argument("--sweep-limit", type=int, default=24)
    args = p.parse_args()
    if args.stage in ("prepare", "all"):
        prepare(args.out)
    if args.stage in ("train", "all"):
        train(args.out, args.steps, args.batch_size, args.dtype, args.runs.split(","))
    if args.stage in ("distill", "all"):
        distill(args.out, args.dtype)
    if args.stage in ("finish", "all"):
        finish(args.out, args.sweep_limit)


if __name__ == "__main__":
    main()
