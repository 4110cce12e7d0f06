"""LayerSkip training on the transformers Trainer: one code path for one CPU process, torchrun DDP and FSDP.

`train(config)` loads the model and data, wraps the causal LM in `LayerSkipModel` (layer dropout + early-exit
loss) and runs `LayerSkipTrainer`, a transformers Trainer whose loss is the early-exit loss at the global step:
  - the schedules p(l, t), C(t, l), w(t, l) and the layer-dropout masks are functions of the optimizer step
    (and of the seed, micro-batch and rank), so a run resumed from a checkpoint continues them exactly;
  - checkpoints (`checkpoint-N/`) and the final model (the output directory) are transformers checkpoints
    with the tokenizer and the draft vocabulary (draft_vocab.json: the training data's most frequent tokens),
    which `layerskip.models.load(dir)` loads; each is written to a staging directory and renamed into place,
    so a crash never leaves a half-written one;
  - decoding settings stored in the starting model's config ("layerskip": exit_layer, num_speculations,
    confidence_threshold, an inline draft_vocab) were tuned for the old weights and are not carried over;
  - a NaN/inf loss stops training before that step is applied; the last good state is saved as a checkpoint.
DDP runs with find_unused_parameters=False: every layer's parameters are in the graph on every rank at every
step even when layer dropout drops all of a rank's rows (see `layer_dropout.run_on_rows`).
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from layerskip import draft_vocab
from layerskip.errors import LayerSkipError
from layerskip.files import replace_dir, write_json
from layerskip.training.config import TrainConfig
from layerskip.training.curriculum import Curriculum
from layerskip.training.data import build_datasets
from layerskip.training.early_exit_loss import check_scales
from layerskip.training.layer_dropout import LayerDropout
from layerskip.training.loading import load_config_and_tokenizer, load_weights
from layerskip.training.model import LayerSkipModel
from layerskip.training.step_log import NonFiniteLoss, StepLogger, StepStats, TrainingLog

CONFIG_NAME = "layerskip_train.json"
# a finished run's final model: single-file or sharded weights (save_pretrained writes one or the other)
FINAL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# decoding settings in config.json's "layerskip" that belong to the weights they were tuned on
DECODING_SETTINGS = ("exit_layer", "num_speculations", "confidence_threshold", "draft_vocab")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainResult:
    """Where the model went, how many optimizer steps it has, its held-out metrics, and the model itself."""

    output_dir: Path
    steps: int
    eval_metrics: dict
    model: torch.nn.Module  # the trained causal LM (this process's replica)


class LayerSkipTrainer(Trainer):
    """A transformers Trainer whose model is a `LayerSkipModel`: early-exit loss, per-exit logs, safe saves."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; the Trainer divides by GA

    def __init__(self, *args, step_logger: StepLogger, stats: StepStats, draft_vocab_ids: list[int] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.step_logger, self.stats = step_logger, stats
        self.draft_vocab_ids = draft_vocab_ids  # saved as draft_vocab.json with every model
        self._micro = (-1, 0)  # (global step, micro-batches seen in it)
        self._staging: Path | None = None

    # ---- the loss --------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step
        micro = self._micro[1] if self._micro[0] == step else 0
        self._micro = (step, micro + 1)
        input_ids = inputs["input_ids"]
        out = model(input_ids=input_ids, labels=inputs.get("labels"), step=step, micro_step=micro)
        if model.training:
            self.stats.add(out.loss, out.exit_losses, out.exit_weights, input_ids.numel(), out.unlikelihood)
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the mean CE of each exit since the last one
            logs.update(self.step_logger.pop_exit_means())
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Mean CE of every exit on the held-out blocks (no dropout); eval_loss is the last layer's."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return {}
        loader = self.get_eval_dataloader(dataset)
        model = self.model
        was_training = model.training
        model.eval()
        sums, rows = None, torch.zeros((), device=self.args.device)
        with torch.no_grad():
            for batch in loader:
                input_ids = self._prepare_inputs(batch)["input_ids"]
                out = model(input_ids=input_ids)
                losses = torch.stack([out.exit_losses[l] for l in sorted(out.exit_losses)]) * input_ids.shape[0]
                sums = losses if sums is None else sums + losses
                rows += input_ids.shape[0]
        model.train(was_training)
        if sums is None:
            return {}
        vec = torch.cat([sums.float(), rows[None].float()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(vec)
        means = (vec[:-1] / vec[-1].clamp(min=1)).tolist()
        metrics = {f"{metric_key_prefix}_loss": means[-1]}
        metrics.update({f"{metric_key_prefix}_exit_loss_{l}": v for l, v in enumerate(means)})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- saving: transformers format, staged then renamed ---------------------------------------------
    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N under <output_dir>/.staging, then rename it into <output_dir>."""
        out = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        self._staging = out / ".staging"
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            replace_dir(out / ".staging" / name, out / name)
            shutil.rmtree(out / ".staging", ignore_errors=True)
            if self.args.save_total_limit:
                for old in list_checkpoints(out)[: -self.args.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The causal LM with save_pretrained (+ tokenizer, draft_vocab.json), written to a temp dir beside
        `output_dir`, then its files moved in one by one: `output_dir` may already hold checkpoints and logs,
        which stay."""
        output_dir = Path(output_dir or self.args.output_dir)
        if not self.args.should_save:
            return
        lm = self.accelerator.unwrap_model(self.model).causal_lm
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent) as tmp:
            tmp = Path(tmp)
            lm.save_pretrained(tmp, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(tmp)
            if self.draft_vocab_ids is not None:
                draft_vocab.write(tmp, self.draft_vocab_ids)
            for f in tmp.iterdir():
                f.replace(output_dir / f.name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint's weights into the wrapper (same parameter names); tied heads may be absent."""
        if self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from transformers.trainer_utils import load_sharded_checkpoint
        import safetensors.torch

        target = model or self.model
        single = Path(resume_from_checkpoint) / "model.safetensors"
        if single.exists():
            result = target.load_state_dict(safetensors.torch.load_file(single, device="cpu"), strict=False)
        else:
            result = load_sharded_checkpoint(target, resume_from_checkpoint, strict=False)
        tied = {"lm_head.weight"} if getattr(target.lm_config, "tie_word_embeddings", False) else set()
        bad = sorted(set(result.missing_keys) - tied) + sorted(result.unexpected_keys)
        if bad:
            raise LayerSkipError(f"--resume {resume_from_checkpoint}: weights do not match the model ({bad[0]}, ...)")


def train(config: TrainConfig) -> TrainResult:
    """Run LayerSkip training as configured; returns where the model went. Raises LayerSkipError on bad input."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise LayerSkipError(f"--output-dir {out}: exists and is not a directory")
    resume = resolve_resume(config.resume, out)
    if resume is None and holds_run(out):
        raise LayerSkipError(
            f"--output-dir {out} already holds a training run; continue it with --resume, or choose a new directory"
        )
    lm_config, tokenizer = load_config_and_tokenizer(config)
    args = training_arguments(config, lm_config)
    num_layers = lm_config.num_hidden_layers
    max_pos = getattr(lm_config, "max_position_embeddings", None)
    if max_pos is not None and config.seq_len > max_pos:
        raise LayerSkipError(f"--seq-len {config.seq_len} is beyond the model's {max_pos} positions")
    if config.early_exit_weights is not None:
        try:
            check_scales(config.early_exit_weights, num_layers)
        except ValueError as e:
            raise LayerSkipError(f"--early-exit-weights: {e}") from None
    with args.main_process_first(desc="tokenising"):
        train_set, eval_set = build_datasets(
            config.data, tokenizer, config.seq_len, config.eval_fraction, config.seed, config.text_field,
            config.data_split,
        )
    causal_lm = load_weights(config, lm_config)
    drop_decoding_settings(causal_lm.config)
    ranked = rank_draft_vocab(train_set.blocks, causal_lm.config.vocab_size)
    causal_lm.draft_vocab_ids = ranked  # as `models.load` attaches it: the returned model drafts over it too
    model = LayerSkipModel(
        causal_lm,
        LayerDropout(num_layers, config.layer_dropout_max, config.max_steps, config.layer_dropout_depth,
                     config.layer_dropout_schedule, config.seed),
        Curriculum(config.curriculum, num_layers, config.rotation, config.max_steps),
        config.early_exit_scale,
        rank=args.process_index,
        exit_targets=config.early_exit_targets,
        early_exit_weights=config.early_exit_weights,
        unlikelihood=config.unlikelihood,
    ).train()
    stats, log = StepStats(), TrainingLog(out)
    logger = StepLogger(stats, model.schedule, log)
    trainer = LayerSkipTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        data_collator=_collate, callbacks=[logger], step_logger=logger, stats=stats, draft_vocab_ids=ranked,
    )
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_NAME, asdict(config))
        if resume is not None:
            log.keep_until(_checkpoint_step(resume))
        elif log.path.exists():
            log.path.unlink()  # a fresh run in a used directory: its log starts over
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except NonFiniteLoss as e:
        raise LayerSkipError(_stop_on_nan(trainer, e, out)) from None
    trainer.save_model(str(out))
    metrics = trainer.evaluate() if eval_set is not None and config.eval_steps == 0 else {}
    return TrainResult(out, trainer.state.global_step, metrics, causal_lm)


def rank_draft_vocab(token_ids: torch.Tensor, vocab_size: int) -> list[int]:
    """The training data's most frequent token ids, as many as cover draft_vocab.COVERAGE of them: the draft
    vocabulary saved with the model (draft_vocab.json) for self-speculative drafting over them.

    Args:
        token_ids: any-shaped integer tensor of the training tokens; ids outside [0, vocab_size) are ignored.
    """
    token_ids = token_ids[(token_ids >= 0) & (token_ids < vocab_size)]
    return draft_vocab.rank_tokens(draft_vocab.count_tokens(token_ids, vocab_size))


def drop_decoding_settings(lm_config) -> None:
    """Remove DECODING_SETTINGS from the config's "layerskip" dict (other keys stay; an emptied dict goes):
    they were tuned for the weights training is about to change."""
    stored = getattr(lm_config, "layerskip", None)
    if not isinstance(stored, dict):
        return
    kept = {k: v for k, v in stored.items() if k not in DECODING_SETTINGS}
    if kept:
        lm_config.layerskip = kept
    else:
        delattr(lm_config, "layerskip")


def holds_run(out: Path) -> bool:
    """Whether `out` holds a training run: a checkpoint-N directory or a finished run's final weights."""
    return bool(list_checkpoints(out)) or any((out / name).is_file() for name in FINAL_WEIGHTS)


def _stop_on_nan(trainer: LayerSkipTrainer, e: NonFiniteLoss, out: Path) -> str:
    """Save the last good state (the bad step was not applied) and say where it is."""
    for cb in trainer.callback_handler.callbacks:  # close the progress bar, so the error is the last line
        if getattr(cb, "training_bar", None) is not None:
            cb.training_bar.close()
            cb.training_bar = None
    good = e.step - 1
    head = f"{e.what} is {e.value} at step {e.step}; stopped before applying it."
    if good > 0 and _all_finite(trainer) and not (out / f"checkpoint-{good}").exists():
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
    saved = [p for p in list_checkpoints(out) if _checkpoint_step(p) <= good]
    if not saved:
        return f"{head} No checkpoint was saved before it (lower --lr, or check the data)"
    return (
        f"{head} The last good state is {saved[-1]} (resume with --resume latest, after lowering --lr or fixing "
        "the data)"
    )


def _all_finite(trainer: LayerSkipTrainer) -> bool:
    """Whether every parameter is finite on every rank (one all-reduce, so every rank answers alike)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.model.parameters()]  # FSDP shards
    flag = torch.tensor(float(all(bool(torch.isfinite(p).all()) for p in local)), device=trainer.args.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo's flags;
    None where that file is missing (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo))
    return bool(flags)


def training_arguments(c: TrainConfig, lm_config=None) -> TrainingArguments:
    if c.dtype == "float16" and not torch.cuda.is_available():
        raise LayerSkipError("--dtype float16 needs a GPU; use bfloat16 or float32 on the CPU")
    if c.dtype == "bfloat16" and not _has_accelerator() and cpu_has_native_bf16() is False:
        # measured: 122 s a step against 8.7 s in float32 (11.8M-parameter Llama, AVX2 CPU, 2 threads)
        print("warning: this CPU has no bfloat16 arithmetic (no AVX512-BF16 or AMX): --dtype bfloat16 runs "
              "about 10x slower than float32 here; use --dtype float32", file=sys.stderr)
    fsdp = {}
    if c.fsdp and not _has_accelerator():
        # accelerate runs FSDP on accelerator processes only; on the CPU it would silently fall back to DDP
        raise LayerSkipError("--fsdp needs GPUs (accelerate shards over accelerator processes only); "
                             "on the CPU, torchrun runs plain DDP: drop --fsdp")
    if c.fsdp:
        # FSDP2, one unit per decoder layer (+ the root: embeddings, norm, head), full state dicts on save so
        # that checkpoints stay transformers checkpoints
        archs = getattr(lm_config, "architectures", None) or ["LlamaForCausalLM"]
        layer_cls = archs[0].replace("ForCausalLM", "DecoderLayer")
        fsdp = dict(fsdp=True, fsdp_config={
            "version": 2, "transformer_layer_cls_to_wrap": [layer_cls], "state_dict_type": "FULL_STATE_DICT",
        })
    return TrainingArguments(
        **fsdp,
        output_dir=c.output_dir,
        max_steps=c.max_steps,
        per_device_train_batch_size=c.batch_size,
        per_device_eval_batch_size=c.batch_size,
        gradient_accumulation_steps=c.grad_accum,
        learning_rate=c.lr,
        lr_scheduler_type=c.lr_scheduler,
        warmup_steps=c.warmup_steps,
        weight_decay=c.weight_decay,
        max_grad_norm=c.max_grad_norm,
        seed=c.seed,
        data_seed=c.seed,
        bf16=c.dtype == "bfloat16",
        fp16=c.dtype == "float16",
        logging_steps=c.logging_steps,
        save_strategy="steps" if c.save_steps else "no",
        save_steps=c.save_steps or 500,
        eval_strategy="steps" if c.eval_steps else "no",
        eval_steps=c.eval_steps or None,
        report_to=_report_to(c.report_to),
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient every step: run_on_rows
        dataloader_num_workers=0,
        disable_tqdm=False,
        # without an accelerator, say so: accelerate then runs torchrun processes as MULTI_CPU over gloo
        use_cpu=not _has_accelerator(),
    )


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    """--resume PATH | latest -> the checkpoint directory (it must hold trainer_state.json)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise LayerSkipError(f"--resume latest: no checkpoint-N directory in {out}")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise LayerSkipError(f"--resume {resume}: not a training checkpoint (no trainer_state.json)")
    return path


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint-N directories in `out`, oldest step first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def _checkpoint_step(path: Path) -> int:
    return json.loads((path / "trainer_state.json").read_text())["global_step"]


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([s["input_ids"] for s in samples])}  # (B, T)


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


def _report_to(value: str):
    if value != "auto":
        return value
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") else "none"

