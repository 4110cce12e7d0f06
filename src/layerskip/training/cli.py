"""`layerskip train` and `layerskip selfgen`: argument parsing and printing only; the work is
`layerskip.training.trainer.train` and `layerskip.training.selfgen`.

Flags override the YAML recipe (--config), which overrides the preset (--preset), which overrides the
defaults in `TrainConfig`. Every flag defaults to "not given" so that this order holds.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

_EXAMPLES = """examples:
  layerskip train --data src/ --output-dir runs/code --preset code_finetuning --max-steps 200
  layerskip train --init config.json --tokenizer tok/ --data corpus.jsonl --output-dir runs/scratch \\
      --preset pretraining_from_scratch
  torchrun --nproc-per-node 2 -m layerskip train --data corpus.jsonl --output-dir runs/ddp
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    _add_selfgen_parser(subparsers)
    return _add_train_parser(subparsers)


def _add_selfgen_parser(subparsers) -> argparse.ArgumentParser:
    from layerskip.training.selfgen import SHAPES

    p = subparsers.add_parser(
        "selfgen",
        help="write the model's own greedy continuations of code prompts, for self-distillation",
        description="Cut prompts from code (--data), continue each greedily with the model, and write JSONL "
        "({\"text\": prompt + continuation}) for `layerskip train --data OUT --early-exit-targets final`: the early "
        "exits then learn the last layer's predictions on the text decoding meets.",
        epilog="example:\n  layerskip selfgen --data src/ --limit 4000 --out runs/selfgen.jsonl\n"
               "  layerskip train --data runs/selfgen.jsonl --early-exit-targets final --curriculum none ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model spec (dir, hub id, 'default', 'smollm2-135m'); default: built-in")
    p.add_argument("--data", action="append", metavar="PATH", required=True,
                   help="code file, dir, glob or .jsonl to cut prompts from (repeatable): one per function, in the "
                        "--prompt-shape, with 400 characters before it")
    p.add_argument("--text-field", default="text", help="JSONL field holding the code (default: text)")
    p.add_argument("--limit", type=int, help="at most this many prompts (a seeded shuffle picks them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-shape", choices=sorted(SHAPES), default="def",
                   help="def: a function's def line and two more; docstring: its def line and docstring, the shape "
                   "of a HumanEval prompt (default: def)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="the JSONL to write")
    p.set_defaults(func=run_selfgen)
    return p


def run_selfgen(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from layerskip import models
    from layerskip.errors import LayerSkipError
    from layerskip.runtime import set_threads
    from layerskip.training.data import documents
    from layerskip.training.selfgen import greedy_continuations, prompt_budget, prompts_from, write_jsonl

    for name in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LayerSkipError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise LayerSkipError(f"--out {out}: no such directory {out.parent}")
    set_threads(args.threads)
    prompts = prompts_from(documents(args.data, args.text_field), args.limit, args.seed, args.prompt_shape)
    if not prompts:
        raise LayerSkipError(f"no prompts in --data {' '.join(args.data)} (no functions found)")
    model, tokenizer = models.load(args.model)
    if tokenizer is None:
        raise LayerSkipError(f"--model {args.model}: no tokenizer beside the weights")
    prompt_budget(model, args.max_new_tokens)
    with tqdm(total=len(prompts), desc="selfgen", unit="prompt") as bar:
        n = write_jsonl(greedy_continuations(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                                             progress=bar), out)
    print(f"wrote {n} continuations ({args.max_new_tokens} tokens each) to {out}")
    return 0


def _add_train_parser(subparsers) -> argparse.ArgumentParser:
    from layerskip.training.config import DTYPES, LR_SCHEDULERS, PRESETS

    p = subparsers.add_parser(
        "train",
        help="train a model with layer dropout and the early-exit loss (LayerSkip)",
        description="Train a transformers causal LM so its early layers can exit: layer dropout + early-exit "
        "loss + curricula (LayerSkip, Elhoushi et al. 2024). Runs on one process or under torchrun.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model",
                   help="checkpoint to continue from (dir, hub id, 'default', 'smollm2-135m'); default: built-in")
    g.add_argument("--init", metavar="CONFIG", help="random init from a config.json or a dir holding one")
    g.add_argument("--tokenizer", help="tokenizer dir or hub id (with --init; default: the built-in model's)")
    g.add_argument("--dtype", choices=DTYPES, help="float32 (default), or bfloat16/float16 mixed precision")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="PATH",
                   help="text/code file, dir, glob, .jsonl, or a datasets name (repeatable)")
    g.add_argument("--data-split", help="split, for a datasets name (default: train)")
    g.add_argument("--text-field", help="JSONL / datasets field holding the text (default: text)")
    g.add_argument("--eval-fraction", type=float, help="share of blocks held out (default: 0.05)")
    g.add_argument("--seq-len", type=int, help="tokens per packed block (default: 512)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--output-dir", help="where checkpoints, the final model and training_log.jsonl go")
    g.add_argument("--max-steps", type=int, help="optimizer steps T (default: 100)")
    g.add_argument("--batch-size", type=int, help="blocks per process per micro-batch (default: 8)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4)")
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, help="default: cosine")
    g.add_argument("--warmup-steps", type=int, help="default: 0")
    g.add_argument("--weight-decay", type=float, help="default: 0")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (default: 1.0)")
    g.add_argument("--seed", type=int, help="default: 0")
    g.add_argument("--fsdp", action="store_true", default=None,
                   help="shard parameters, gradients and optimizer state over the processes (FSDP2, with torchrun)")
    g = p.add_argument_group("LayerSkip")
    g.add_argument("--layer-dropout-max", type=float, metavar="P", help="p_max in [0, 1) (default: 0.1)")
    g.add_argument("--layer-dropout-depth", metavar="D", help="D(l): exponential (default), linear, uniform")
    g.add_argument("--layer-dropout-schedule", metavar="S",
                   help="S(t): constant (default), exponential (from scratch), linear")
    g.add_argument("--early-exit-scale", type=float, metavar="E", help="e_scale in [0, 1] (default: 0.2)")
    g.add_argument("--early-exit-weights", metavar="W0,..,WL-1",
                   help="explicit e(l) for every layer, replacing e_scale's formula (e.g. 0,1,1,1,0,0,0,2 to train "
                        "the exits a drafter uses); normalised over the active exits")
    g.add_argument("--early-exit-targets", metavar="Y",
                   help="what early exits learn: labels (the data; default, as in the paper), final (the last "
                        "layer's own greedy prediction: self-distillation, which is what drafting needs) or "
                        "final-soft (the last layer's whole distribution)")
    g.add_argument("--unlikelihood", type=float, metavar="A",
                   help="weight of a token-level unlikelihood term on the last layer (Welleck et al. 2020): pushes "
                        "down tokens already in the context other than the true next one, against greedy loops "
                        "(default: 0 = off)")
    g.add_argument("--curriculum", metavar="C", help="rotational (default), gradual, none (every layer), last (no early exit)")
    g.add_argument("--rotation", type=int, metavar="R", help="rotational curriculum period (default: 8)")
    g.add_argument("--preset", help=f"paper settings: {', '.join(PRESETS)}")
    g.add_argument("--config", metavar="YAML", help="recipe file (keys: the option names with _ for -)")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps, 0 = final model only (default: 200)")
    g.add_argument("--save-total-limit", type=int, help="keep the N newest checkpoints")
    g.add_argument("--eval-steps", type=int, help="evaluate every N steps, 0 = at the end (default: 0)")
    g.add_argument("--logging-steps", type=int, help="console/report_to every N steps (default: 10)")
    g.add_argument("--report-to", help="transformers report_to (default: tensorboard when installed)")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or the newest one in --output-dir")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace):
    """The TrainConfig for parsed `layerskip train` arguments (preset < --config recipe < flags)."""
    from layerskip.training.config import build_config, field_names

    overrides = {k: getattr(args, k, None) for k in field_names() if k != "preset"}
    return build_config(recipe=args.config, preset=args.preset, **overrides)


def run(args: argparse.Namespace) -> int:
    from layerskip.training.trainer import train

    import torch.distributed as dist

    result = train(config_from_args(args))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # a process group left to interpreter exit can abort a worker (gloo)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, only the main process prints
        return 0
    if result.eval_metrics:
        loss = result.eval_metrics.get("eval_loss")
        print(f"held-out loss (last layer): {loss:.4f}")
    print(f"trained {result.steps} steps; model saved to {result.output_dir}")
    return 0
