"""The stand-in built-in default model, used until a trained one ships in the package.

It is an UNTRAINED model: random weights of the built-in shape (`STANDIN_SHAPE`), with a real byte-level
BPE tokenizer trained on part of the standard-library corpus (`layerskip.corpus`). It lets every command
run end to end before the trained default exists; its outputs are noise. Its config.json says so:
`"layerskip": {"trained": false, "note": "untrained stand-in"}`.

Created once (a few seconds) by `ensure_standin`, atomically: it is built in a temporary directory beside
the target and renamed into place, so an interrupted build never leaves a half-written model behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from layerskip.errors import LayerSkipError

# The built-in shape. Sized for issue 7's budget of <= 25 MB of fp16/bf16 weights (11.8M parameters,
# 23.6 MB in bf16) while keeping 8 layers for early exit; head_dim 64 with grouped-query attention.
STANDIN_SHAPE = dict(
    num_layers=8,
    hidden_size=384,
    intermediate_size=768,
    num_heads=6,
    num_kv_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
VOCAB_SIZE = 4096
TOKENIZER_CHARS = 4_000_000  # text the tokenizer is trained on: ~1 s on 2 cores
STANDIN_MARKER = {"trained": False, "note": "untrained stand-in"}
_STALE_TEMP_S = 3600  # temp dirs older than this are leftovers of a killed build


def build_once(target_dir: Path, build: Callable[[Path], None], *, marker: str = "config.json") -> Path:
    """Create `target_dir` by calling `build(tmp_dir)`, then renaming tmp_dir into place; once.

    If `target_dir/marker` exists the directory is complete (it only ever appears by rename), and it is
    returned at once. The temporary directory sits beside `target_dir` (same filesystem, so the rename is
    atomic) and is removed if `build` fails. When two processes build at once, the first rename wins and
    the other's copy is discarded.
    """
    target_dir = Path(target_dir)
    if (target_dir / marker).exists():
        return target_dir
    if target_dir.exists() and (not target_dir.is_dir() or any(target_dir.iterdir())):
        raise LayerSkipError(f"{target_dir} exists but holds no complete model ({marker} missing); delete it and retry")
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target_dir.name}.tmp-"
    _remove_stale_temps(target_dir.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target_dir.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target_dir)  # atomic; also replaces an empty target_dir
        except OSError:
            if not (target_dir / marker).exists():
                raise  # not a lost race: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target_dir


def _remove_stale_temps(parent: Path, prefix: str) -> None:
    now = time.time()
    for old in parent.glob(prefix + "*"):
        try:
            if now - old.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def ensure_standin(target_dir: Path) -> Path:
    """Create the stand-in default model in `target_dir` unless it is already there.

    Args:
        target_dir: where the checkpoint lives (models.default_model_dir() uses `cache_dir()/standin-model`).
    Returns:
        `target_dir`, a transformers checkpoint: config.json (with the "layerskip" stand-in marker),
        model.safetensors (bf16), generation_config.json, tokenizer.json, tokenizer_config.json.
    """
    return build_once(Path(target_dir), _build_standin)


def _build_standin(out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    from layerskip.corpus import spread, stdlib_files
    from layerskip.models import make_random_model
    from layerskip.tokenizer import train_bpe_tokenizer

    files = spread(stdlib_files("train"), TOKENIZER_CHARS)
    tokenizer = train_bpe_tokenizer(
        files, VOCAB_SIZE, out, model_max_length=STANDIN_SHAPE["max_position_embeddings"]
    )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = make_random_model(
        "llama", vocab_size=len(tokenizer), seed=0,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, **STANDIN_SHAPE,
    )
    model.config.layerskip = dict(STANDIN_MARKER)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    model.to(torch.bfloat16).save_pretrained(str(out))
