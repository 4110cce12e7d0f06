"""Per-layer early-exit analysis (the paper's per-layer figure): how good is exiting after layer l?

For every l in 1..L, teacher-forced on a text, the exit after the first l decoder layers (through the
model's own final norm and LM head) is scored by
  agreement   the fraction of positions where its top-1 token equals the final layer's top-1 token
              (what self-speculative acceptance depends on; exactly 1.0 at l = L);
  perplexity  exp of its mean cross-entropy against the text's next tokens;
  accuracy    the fraction of positions where its top-1 token is the text's next token.

Where the hidden states come from: `model(ids, output_hidden_states=True).hidden_states` has L + 1
entries. In transformers 5, entry 0 is the embedding output, entry l (1 <= l < L) is decoder layer
l-1's raw output, and entry L is the last layer's output *already passed through the final norm*.
So entries 1..L-1 get norm + head, and entry L gets the head only (tests check this against a
hand-run of the layers).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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


def layer_logits(model, hidden_states, layer: int) -> torch.Tensor:
    """Exit logits after `layer` decoder layers from `output_hidden_states` (see the module docstring)."""
    L = model.config.num_hidden_layers
    h = hidden_states[layer]
    if layer < L:
        h = model.model.norm(h)
    return model.lm_head(h)


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
    L = model.config.num_hidden_layers
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
            ids = torch.tensor([w], device=model.device)  # (1, T)
            out = model(ids, output_hidden_states=True, use_cache=False)
            targets = ids[0, 1:]  # (T-1,)
            final = out.logits[0, :-1].argmax(-1)  # (T-1,)
            for layer in range(1, L + 1):
                logits = layer_logits(model, out.hidden_states, layer)[0, :-1].float()  # (T-1, V)
                top1 = logits.argmax(-1)
                agree[layer - 1] += int((top1 == final).sum())
                correct[layer - 1] += int((top1 == targets).sum())
                nll[layer - 1] += float(F.cross_entropy(logits, targets, reduction="sum"))
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
