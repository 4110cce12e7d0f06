"""Model, config and tokenizer for a training run: --model (a checkpoint) or --init (a config, random weights).

The config and tokenizer come first, without weights, so that bad input (a missing model, an unsupported
architecture, a tokenizer larger than the vocabulary, a --seq-len beyond the positions) fails in a second,
before any weights are loaded or anything is written.
"""
from __future__ import annotations

from pathlib import Path

import torch

from layerskip.errors import LayerSkipError
from layerskip.training.config import TrainConfig


def load_config_and_tokenizer(c: TrainConfig):
    """(model config, tokenizer) for --model or --init, without loading any weights (so bad input fails fast)."""
    from transformers import AutoConfig

    from layerskip import models

    if c.init is None:
        where = models.resolve(c.model)
        what = f"--model {c.model or 'default'}"
    else:
        where = Path(c.init).expanduser()
        what = f"--init {c.init}"
        if not where.exists():
            raise LayerSkipError(f"{what}: no such file or directory")
    try:
        lm_config = AutoConfig.from_pretrained(str(where))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerSkipError(f"{what}: cannot read its config ({first})") from None
    archs = getattr(lm_config, "architectures", None) or []
    if archs and not set(archs) & set(models.SUPPORTED_ARCHITECTURES):
        raise LayerSkipError(
            f"{what}: unsupported architecture {archs[0]}; supported: {', '.join(models.SUPPORTED_ARCHITECTURES)}"
        )
    if c.tokenizer is not None:
        tokenizer = _load_tokenizer(c.tokenizer)
    elif c.init is None:
        tokenizer = _load_tokenizer(str(where), f"{what} has no tokenizer; give --tokenizer")
    else:
        tokenizer = _load_tokenizer(str(models.resolve(None)))
    if len(tokenizer) > lm_config.vocab_size:
        raise LayerSkipError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {lm_config.vocab_size}"
        )
    return lm_config, tokenizer


def load_weights(c: TrainConfig, lm_config):
    """The causal LM in fp32 train mode: the --model checkpoint, or a seeded random init from --init."""
    from transformers import AutoModelForCausalLM

    from layerskip import models

    if c.init is None:
        lm, _ = models.load(c.model, dtype=torch.float32)
    else:
        torch.manual_seed(c.seed)
        try:
            lm = AutoModelForCausalLM.from_config(lm_config)
        except ValueError as e:
            raise LayerSkipError(f"--init {c.init}: {str(e).splitlines()[0]}") from None
        models.check_supported(lm)
    return lm.float().train()


def _load_tokenizer(spec: str, message: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerSkipError(message or f"--tokenizer {spec}: cannot load a tokenizer ({first})") from None
