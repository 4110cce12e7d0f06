"""Per-step bookkeeping: exit losses summed over micro-batches and ranks, `training_log.jsonl`, NaN detection.

`training_log.jsonl` gets one JSON object per optimizer step, written by the main process only:
  step               the optimizer step just taken, 1-based (the schedules used t = step - 1)
  loss               the early-exit loss J, mean over micro-batches and ranks
  exit_losses        {layer: CE} for the exits active at this step (layer L-1 is the model's normal output)
  exit_weights       {layer: w(t, layer)} for the same exits
  unlikelihood       the last layer's unlikelihood term UL, before alpha and its exit weight (only with --unlikelihood;
                     loss = sum of weight * exit loss + alpha * w(t, L-1) * UL)
  layer_dropout      [p(l, t) for every layer l]
  learning_rate      the rate this step used
  tokens             tokens of this step, all ranks and micro-batches
  tokens_per_second  tokens of this step (all ranks) / its wall time (forward, backward, optimizer;
                     data loading, evaluation and checkpointing excluded)

The loss and the gradient norm are checked before the optimizer applies the step: a NaN or infinite value (on
any rank: the check is on all-reduced values, so every rank decides alike) raises `NonFiniteLoss`, and the
weights stay those of the last good step.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from layerskip.files import write_text

LOG_NAME = "training_log.jsonl"


class NonFiniteLoss(RuntimeError):
    """The loss (or the gradient) of optimizer step `step` (1-based) is NaN or infinite; it was not applied."""

    def __init__(self, step: int, value: float, what: str = "loss"):
        super().__init__(f"{what} is {value} at step {step}")
        self.step, self.value, self.what = step, value, what


def _grad_norm(model) -> torch.Tensor:
    """The gradients' 2-norm on this rank (NaN/inf if any gradient is), as a 0-dim tensor; no host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor over the shards


class StepStats:
    """Sums over the micro-batches of one optimizer step (tensors, so no host sync per micro-batch)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss = None
        self.exit_sums: dict[int, torch.Tensor] = {}
        self.weights: dict[int, float] = {}
        self.unlikely: torch.Tensor | None = None
        self.micro = 0
        self.tokens = 0

    def add(self, loss: torch.Tensor, exit_losses: dict[int, torch.Tensor], weights: dict[int, float], tokens: int,
            unlikelihood: torch.Tensor | None = None):
        loss = loss.detach().float()
        if unlikelihood is not None:
            u = unlikelihood.detach().float()
            self.unlikely = u if self.unlikely is None else self.unlikely + u
        self.loss = loss if self.loss is None else self.loss + loss
        for l, v in exit_losses.items():
            self.exit_sums[l] = v.float() + self.exit_sums[l] if l in self.exit_sums else v.float()
        self.weights = weights
        self.micro += 1
        self.tokens += tokens

    def reduce(self, device, grad_norm: torch.Tensor) -> tuple[float, dict[int, float], int, float, float | None]:
        """(mean loss, {layer: mean CE}, total tokens, grad-norm sum, mean UL or None) over micro-batches and ranks.

        One all-reduce carries everything; a NaN/inf on any rank shows in the sums on every rank.
        """
        layers = sorted(self.exit_sums)
        parts = [self.loss if self.loss is not None else torch.tensor(float("nan"))]
        parts += [self.exit_sums[l] for l in layers]
        parts += [self.unlikely] if self.unlikely is not None else []
        extra = [float(self.micro), float(self.tokens)]
        vec = torch.stack([p.to(device).float() for p in parts] + [grad_norm.to(device).float()]
                          + [torch.tensor(x, device=device) for x in extra])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(vec)
        vec = vec.cpu().tolist()
        micro = max(vec[-2], 1.0)
        exits = {l: vec[1 + i] / micro for i, l in enumerate(layers)}
        unlikely = vec[1 + len(layers)] / micro if self.unlikely is not None else None
        return vec[0] / micro, exits, int(vec[-1]), vec[-3], unlikely


class TrainingLog:
    """`training_log.jsonl`: appended one line per step; rewritten (temp + rename) only to cut it on resume."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOG_NAME

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        return records

    def keep_until(self, step: int) -> None:
        """Drop the records after `step` (they belong to a run that is being resumed from `step`)."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


class StepLogger(TrainerCallback):
    """Reduces the step's statistics, stops on a non-finite loss, writes `training_log.jsonl`, feeds the logs.

    Args:
        stats: filled by the trainer's compute_loss.
        schedule: step t (0-based) -> (p(l, t) list, {layer: w(t, layer)}).
        log: the jsonl file; written on the main process only.
    """

    def __init__(self, stats: StepStats, schedule, log: TrainingLog):
        self.stats, self.schedule, self.log = stats, schedule, log
        self.last: dict | None = None  # the last record, for the console / report_to logs
        self.since_log: dict[int | str, list[float]] = {}  # {layer: CEs, "unlikelihood": ULs} since the last log
        self._t0 = None
        self._lr = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        loss, exits, tokens, grad_norm, unlikely = self.stats.reduce(args.device, _grad_norm(model))
        step = state.global_step + 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.stats.reset()
            raise NonFiniteLoss(step, loss if not math.isfinite(loss) else grad_norm, "loss" if
                                not math.isfinite(loss) else "gradient norm")
        rates, weights = self.schedule(state.global_step)
        self._lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        self.last = {
            "step": step,
            "loss": loss,
            "exit_losses": {str(l): v for l, v in exits.items()},
            "exit_weights": {str(l): weights[l] for l in exits},
            "layer_dropout": rates,
            "learning_rate": self._lr,
            "tokens": tokens,
        }
        if unlikely is not None:
            self.last["unlikelihood"] = unlikely
            self.since_log.setdefault("unlikelihood", []).append(unlikely)
        for l, v in exits.items():
            self.since_log.setdefault(l, []).append(v)
        self.stats.reset()

    def on_step_end(self, args, state, control, **kwargs):
        if self.last is None or self.last["step"] != state.global_step:
            return
        seconds = time.perf_counter() - (self._t0 or time.perf_counter())
        record = dict(self.last)
        record["tokens_per_second"] = record["tokens"] / seconds if seconds > 0 else None
        if state.is_world_process_zero:
            self.log.append(record)

    def pop_exit_means(self) -> dict[str, float]:
        """Mean CE per exit (and the mean UL, when on) since the last call, for the console and report_to logs."""
        means = {l: sum(v) / len(v) for l, v in self.since_log.items()}
        out = {f"exit_loss_{l}": means[l] for l in sorted(l for l in means if l != "unlikelihood")}
        if "unlikelihood" in means:
            out["unlikelihood"] = means["unlikelihood"]
        self.since_log.clear()
        return out
