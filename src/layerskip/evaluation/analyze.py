"""Per-layer early-exit analysis (the paper's per-layer figure): how good is exiting after layer l?

For every l in 1..L, teacher-forced on a text, the exit after the first l decoder layers (through the
model's own final norm and LM head) is scored by
  agreement   the fraction of positions where its top-1 token equals the final layer's top-1 token
              (what self-speculative acceptance depends on; exactly 1.0 at l = L);
  perplexity  exp of its mean cross-entropy against the text's next tokens;
  accuracy    the fraction of positions where its top-1 token is the text's next token.

The exits are computed by the decoding engine itself: the text runs through the layers one at a time
(`LayerStack.run`), and each layer's output goes through `LayerStack.logits`, the same final norm + LM head
(`forward.exit_logits`) that drafting, replay and the training loss use.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from layerskip.decoding.api import prepare
from layerskip.errors import LayerSkipError
from layerskip import files as io
from layerskip.evaluation import plots

FIELDS = ["model", "layer", "agreement", "perplexity", "accuracy", "num_tokens"]


@dataclass
class LayerStats:
    layer: int  # decoder layers run before the exit: 1..L
    agreement: float
    perplexity: float
    accuracy: float
    num_tokens: int


def read_texts(paths: list[str]) -> list[str]:
    """Texts from files: .jsonl (a "text" field, else "prompt" + "reference"/"response") or plain text
    (one text per file)."""
    from layerskip.evaluation.tasks import read_jsonl

    texts = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise LayerSkipError(f"--data {p}: no such file")
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            for lineno, row in read_jsonl(path):
                text = row.get("text")
                if text is None and "prompt" in row:
                    text = row["prompt"] + (row.get("reference") or row.get("response") or "")
                if not isinstance(text, str):
                    raise LayerSkipError(f"{path}, line {lineno}: needs a \"text\" (or \"prompt\") string field")
                texts.append(text)
        else:
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise LayerSkipError(f"--data {p}: cannot read it as UTF-8 text ({e})") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LayerSkipError(f"--data {' '.join(paths)}: no text (empty data)")
    return texts


def analyze_layers(model, tokenizer, texts: list[str], *, max_length: int = 512,
                   max_tokens: int | None = None, progress: bool = False) -> list[LayerStats]:
    """Teacher-forced early-exit statistics for every layer 1..L (batch size 1, windows of `max_length`).

    Args:
        texts: the text to score; each is tokenized and cut into windows of at most `max_length` tokens.
        max_tokens: stop after about this many scored positions (None: all).
    Returns:
        one LayerStats per layer, layer 1 first.
    """
    if tokenizer is None:
        raise LayerSkipError("this model has no tokenizer; analyze needs one to encode the text")
    stack = prepare(model)
    model = stack.model
    L = stack.num_layers
    limit = getattr(model.config, "max_position_embeddings", None)
    window = min(max_length, limit) if limit else max_length
    if window < 2:
        raise LayerSkipError(f"--max-length must be >= 2, got {max_length}")
    agree = torch.zeros(L, dtype=torch.long)
    correct = torch.zeros(L, dtype=torch.long)
    nll = torch.zeros(L, dtype=torch.float64)
    count = 0
    windows = [ids[i:i + window] for ids in (tokenizer(t).input_ids for t in texts)
               for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise LayerSkipError("the text is too short: need at least 2 tokens")
    from tqdm import tqdm

    with torch.inference_mode():
        for w in tqdm(windows, desc="analyze", disable=not progress, leave=False, dynamic_ncols=True):
            ids = torch.tensor([w], device=stack.device)  # (1, T)
            targets = ids[0, 1:]  # (T-1,)
            cache = stack.new_cache(len(w))
            h = stack.embed(ids)  # (1, T, H)
            top1 = []  # each exit's top-1 tokens (T-1,); logits are kept for one layer at a time
            for layer in range(L):
                h = stack.run(h, layer, layer + 1, cache, 0)  # (1, T, H): the output of layer `layer`
                logits = stack.logits(h[0, :-1]).float()  # (T-1, V): the exit after layer + 1 layers
                top1.append(logits.argmax(-1))
                correct[layer] += int((top1[-1] == targets).sum())
                nll[layer] += float(F.cross_entropy(logits, targets, reduction="sum"))
            for layer in range(L):
                agree[layer] += int((top1[layer] == top1[-1]).sum())
            count += len(w) - 1
            if max_tokens is not None and count >= max_tokens:
                break
    return [LayerStats(layer=l + 1, agreement=int(agree[l]) / count, perplexity=_exp(float(nll[l]) / count),
                       accuracy=int(correct[l]) / count, num_tokens=count) for l in range(L)]


def write_analysis(results: dict[str, list[LayerStats]], out_dir: str | Path, *, title: str = "") -> tuple[Path, Path]:
    """layers.csv (one row per model and layer) and layers.png (one line per model) in `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LayerSkipError(f"--out {out}: not a directory")
    rows = [{"model": label, **asdict(s)} for label, stats in results.items() for s in stats]
    csv_path, png_path = out / "layers.csv", out / "layers.png"
    io.write_csv(csv_path, rows, FIELDS)
    curves = {label: [asdict(s) for s in stats] for label, stats in results.items()}
    plots.plot_layer_analysis(curves, png_path, title=title)
    return csv_path, png_path


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
