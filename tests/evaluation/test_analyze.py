"""Per-layer early-exit analysis against a slow hand computation."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from layerskip.errors import LayerSkipError
from layerskip.evaluation.analyze import analyze_layers, read_texts, write_analysis

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."]


def hand_layer_logits(model, ids):
    """Run transformers' decoder layers one by one; norm + head after each. -> [L] of (T, V)."""
    from transformers.masking_utils import create_causal_mask

    from layerskip.training.model import mask_cache_argument

    inner = model.model
    h = inner.embed_tokens(ids)  # (1, T, H)
    pos = torch.arange(ids.shape[1])[None]  # (1, T)
    rope = inner.rotary_emb(h, pos)
    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, position_ids=pos,
                              **{mask_cache_argument(): None})
    out = []
    for layer in inner.layers:
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        h = h[0] if isinstance(h, tuple) else h
        out.append(model.lm_head(inner.norm(h))[0])  # (T, V)
    return out


def hand_analysis(model, tokenizer, texts, window):
    L = model.config.num_hidden_layers
    agree, correct, nll, n = [0] * L, [0] * L, [0.0] * L, 0
    for text in texts:
        ids = tokenizer(text).input_ids
        for start in range(0, len(ids), window):
            w = ids[start:start + window]
            if len(w) < 2:
                continue
            per_layer = hand_layer_logits(model, torch.tensor([w]))
            final = per_layer[-1][:-1].argmax(-1)
            targets = torch.tensor(w[1:])
            for l, logits in enumerate(per_layer):
                logits = logits[:-1]
                agree[l] += int((logits.argmax(-1) == final).sum())
                correct[l] += int((logits.argmax(-1) == targets).sum())
                nll[l] += float(F.cross_entropy(logits, targets, reduction="sum"))
            n += len(w) - 1
    return [(agree[l] / n, math.exp(nll[l] / n), correct[l] / n) for l in range(L)], n


@pytest.mark.parametrize("window", [512, 7])
def test_analyze_matches_hand_computation(tiny, tokenizer, window):
    with torch.no_grad():
        expected, n = hand_analysis(tiny, tokenizer, TEXTS, window)
    stats = analyze_layers(tiny, tokenizer, TEXTS, max_length=window)
    assert [s.layer for s in stats] == [1, 2, 3, 4]
    for s, (agreement, ppl, accuracy) in zip(stats, expected):
        assert s.num_tokens == n
        assert s.agreement == pytest.approx(agreement)
        assert s.accuracy == pytest.approx(accuracy)
        assert s.perplexity == pytest.approx(ppl, rel=1e-4)
    assert stats[-1].agreement == 1.0  # the last layer is the final layer: exactly


def test_exact_model_agrees_from_its_exit(tiny_exact, tokenizer):
    stats = analyze_layers(tiny_exact, tokenizer, TEXTS)
    assert [s.agreement for s in stats[1:]] == [1.0, 1.0, 1.0]  # layers >= 2 are identities
    assert stats[1].perplexity == pytest.approx(stats[3].perplexity, rel=1e-5)


def test_write_analysis_and_read_texts(tiny, tiny_exact, tokenizer, tmp_path, write_jsonl):
    a = analyze_layers(tiny, tokenizer, TEXTS)
    b = analyze_layers(tiny_exact, tokenizer, TEXTS)
    csv_path, png_path = write_analysis({"random": a, "exact": b}, tmp_path / "out")
    rows = list(csv.DictReader(open(csv_path)))
    assert [(r["model"], r["layer"]) for r in rows][:2] == [("random", "1"), ("random", "2")]
    assert len(rows) == 8 and float(rows[3]["agreement"]) == 1.0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["layers.csv", "layers.png"]

    txt = tmp_path / "a.txt"
    txt.write_text("plain text file")
    jl = write_jsonl("d.jsonl", [{"text": "one"}, {"prompt": "two", "reference": " three"}])
    assert read_texts([str(txt), str(jl)]) == ["plain text file", "one", "two three"]
    with pytest.raises(LayerSkipError, match="no such file"):
        read_texts([str(tmp_path / "nope.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(LayerSkipError, match="empty data"):
        read_texts([str(empty)])
    with pytest.raises(LayerSkipError, match="line 1: needs a \"text\""):
        read_texts([str(write_jsonl("bad.jsonl", [{"body": 1}]))])
