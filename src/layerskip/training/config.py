"""Training configuration: one dataclass, YAML recipes, and the paper's presets.

Precedence, lowest first: the dataclass defaults < a preset (`--preset`, or `preset:` in the recipe) < a YAML
recipe (`--config`) < command-line flags. Recipe keys are the field names below; an unknown key is an error.

The defaults are the paper's continual-pretraining settings (p_max 0.1, e_scale 0.2, rotational R = 8).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from layerskip.errors import LayerSkipError
from layerskip.training.curriculum import CURRICULA
from layerskip.training.early_exit_loss import EXIT_TARGETS, check_scales
from layerskip.training.layer_dropout import DEPTH_SCALES, TIME_SCALES

PRESETS = ("continual_pretraining", "pretraining_from_scratch", "code_finetuning", "topv2_finetuning")
DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclass
class TrainConfig:
    """Everything `train()` needs. Field names are the recipe keys and (with - for _) the CLI flags."""

    # what to train
    model: str | None = None  # a --model spec (checkpoint dir, hub id, "default"); None = the built-in model
    init: str | None = None  # a config.json (or a dir holding one): random init, for pretraining from scratch
    tokenizer: str | None = None  # with `init`: a tokenizer dir / hub id; default: the built-in model's
    dtype: str = "float32"  # float32, or bfloat16 / float16 mixed precision (weights stay fp32)
    # data
    data: list[str] = field(default_factory=list)  # files, dirs, globs, JSONL, or `datasets` names
    data_split: str = "train"  # for `datasets` names
    text_field: str = "text"  # for JSONL and `datasets`
    eval_fraction: float = 0.05  # share of packed blocks held out for evaluation
    seq_len: int = 512
    # optimisation
    output_dir: str | None = None
    max_steps: int = 100
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2)
    # LayerSkip
    layer_dropout_max: float = 0.1  # p_max
    layer_dropout_depth: str = "exponential"  # D(l)
    layer_dropout_schedule: str = "constant"  # S(t)
    early_exit_scale: float = 0.2  # e_scale
    early_exit_weights: list[float] | None = None  # explicit e(l), one per layer, in place of e_scale's formula
    early_exit_targets: str = "labels"  # what exits before the last learn: "labels" (the data), "final", "final-soft"
    unlikelihood: float = 0.0  # alpha of the last layer's token-level unlikelihood term (0 = none)
    curriculum: str = "rotational"
    rotation: int = 8  # R
    # bookkeeping
    save_steps: int = 200  # 0 = only the final model
    save_total_limit: int | None = None
    eval_steps: int = 0  # 0 = evaluate once, at the end
    logging_steps: int = 10  # console / report_to; training_log.jsonl gets every step
    report_to: str = "auto"  # "auto" = tensorboard when installed, else none
    resume: str | None = None  # a checkpoint dir, or "latest" (the newest in output_dir)
    preset: str | None = None


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_preset(name: str) -> dict[str, Any]:
    """The recipe dict of a packaged preset (src/layerskip/training/recipes/NAME.yaml)."""
    key = name.replace("-", "_")
    if key not in PRESETS:
        raise LayerSkipError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    text = resources.files("layerskip.training").joinpath("recipes", f"{key}.yaml").read_text()
    return _parse_yaml(text, f"preset {key}")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe file as a dict, keys checked against TrainConfig."""
    path = Path(path)
    if not path.is_file():
        raise LayerSkipError(f"--config {path}: no such file")
    return _parse_yaml(path.read_text(), f"--config {path}")


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LayerSkipError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise LayerSkipError(f"{where}: expected a mapping of option: value")
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise LayerSkipError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(field_names())}")
    return values


def build_config(recipe: str | Path | None = None, preset: str | None = None, **overrides) -> TrainConfig:
    """Defaults < preset < recipe < overrides (None values in `overrides` mean "not given")."""
    values: dict[str, Any] = {}
    from_recipe = load_recipe(recipe) if recipe else {}
    preset = preset or from_recipe.get("preset")
    if preset:
        values.update(load_preset(preset))
        values["preset"] = preset
    values.update(from_recipe)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise LayerSkipError(f"unknown option(s) {', '.join(unknown)}")
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(config)
    return config


def _coerce(name: str, value: Any) -> Any:
    """Check a recipe value's type against the dataclass field (YAML gives ints for floats, str for lists)."""
    default = getattr(TrainConfig(), name)
    if name == "data":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise LayerSkipError("data: expected a path or a list of paths")
        return [str(v) for v in value]
    if name == "early_exit_weights":
        return _weights(value)
    kind = type(default) if default is not None else None
    if name in ("save_total_limit",):
        kind = int
    if kind is None:  # optional strings
        if value is not None and not isinstance(value, (str, Path)):
            raise LayerSkipError(f"{name}: expected a string, got {value!r}")
        return None if value is None else str(value)
    if kind is bool and not isinstance(value, bool):
        raise LayerSkipError(f"{name}: expected true or false, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise LayerSkipError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def _weights(value: Any) -> list[float] | None:
    """early_exit_weights from a recipe list or a CLI string "w0,w1,...": numbers >= 0."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    try:
        weights = [float(v) for v in value]
    except (TypeError, ValueError):
        raise LayerSkipError(f"early_exit_weights: expected numbers, one per layer (e.g. 0,1,1,1,0,0,0,2), got {value!r}") from None
    try:
        return check_scales(weights)
    except ValueError as e:
        raise LayerSkipError(f"early_exit_weights: {e}, got {value!r}") from None


def validate(c: TrainConfig) -> None:
    """Raise LayerSkipError for the first bad value, with a one-line message."""
    checks = [
        (not (0.0 <= c.layer_dropout_max < 1.0) or math.isnan(c.layer_dropout_max),
         f"--layer-dropout-max must be in [0, 1), got {c.layer_dropout_max}"),
        (not (0.0 <= c.early_exit_scale <= 1.0), f"--early-exit-scale must be in [0, 1], got {c.early_exit_scale}"),
        (c.layer_dropout_depth not in DEPTH_SCALES,
         f"--layer-dropout-depth must be one of {', '.join(DEPTH_SCALES)}, got {c.layer_dropout_depth!r}"),
        (c.layer_dropout_schedule not in TIME_SCALES,
         f"--layer-dropout-schedule must be one of {', '.join(TIME_SCALES)}, got {c.layer_dropout_schedule!r}"),
        (c.early_exit_targets not in EXIT_TARGETS,
         f"--early-exit-targets must be one of {', '.join(EXIT_TARGETS)}, got {c.early_exit_targets!r}"),
        (not 0.0 <= c.unlikelihood < math.inf, f"--unlikelihood must be a number >= 0, got {c.unlikelihood}"),
        (c.curriculum not in CURRICULA, f"--curriculum must be one of {', '.join(CURRICULA)}, got {c.curriculum!r}"),
        (c.rotation < 1, f"--rotation must be >= 1, got {c.rotation}"),
        (c.max_steps < 1, f"--max-steps must be >= 1, got {c.max_steps}"),
        (c.batch_size < 1, f"--batch-size must be >= 1, got {c.batch_size}"),
        (c.grad_accum < 1, f"--grad-accum must be >= 1, got {c.grad_accum}"),
        (c.seq_len < 2, f"--seq-len must be >= 2, got {c.seq_len}"),
        (not c.lr > 0, f"--lr must be > 0, got {c.lr}"),
        (c.warmup_steps < 0, f"--warmup-steps must be >= 0, got {c.warmup_steps}"),
        (c.save_steps < 0 or c.eval_steps < 0, "--save-steps and --eval-steps must be >= 0"),
        (c.logging_steps < 1, f"--logging-steps must be >= 1, got {c.logging_steps}"),
        (not (0.0 <= c.eval_fraction < 1.0), f"--eval-fraction must be in [0, 1), got {c.eval_fraction}"),
        (c.dtype not in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}"),
        (c.lr_scheduler not in LR_SCHEDULERS,
         f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {c.lr_scheduler!r}"),
        (c.model is not None and c.init is not None, "give either --model (continue training) or --init (from scratch), not both"),
        (not c.data, "no training data: give --data (files, directories, JSONL, or a datasets name)"),
        (not c.output_dir, "no output directory: give --output-dir"),
    ]
    for bad, message in checks:
        if bad:
            raise LayerSkipError(message)
