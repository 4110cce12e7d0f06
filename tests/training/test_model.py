"""The training forward over transformers' own decoder layers."""
import pytest
import torch

from layerskip.testing import make_random_model
from layerskip.training.curriculum import Curriculum
from layerskip.training.layer_dropout import LayerDropout
from layerskip.training.model import LayerSkipModel


def _wrap(model, p_max=0.0, curriculum="none", e_scale=0.5, **kw):
    L = model.config.num_hidden_layers
    return LayerSkipModel(model, LayerDropout(L, p_max, **kw), Curriculum(curriculum, L), e_scale)


@pytest.mark.parametrize("arch,extra", [
    ("llama", {}),
    ("mistral", {"sliding_window": 4}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("qwen3", {"head_dim": 16}),
])
def test_hidden_states_and_logits_match_transformers(arch, extra):
    model = make_random_model(arch, num_layers=3, num_kv_heads=2, vocab_size=64, **extra)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = model(ids, output_hidden_states=True)
    ours = _wrap(model).hidden_states(ids)
    for l in range(2):  # transformers: hidden_states[l + 1] is layer l's output; the last one is normed
        torch.testing.assert_close(ours[l], ref.hidden_states[l + 1])
    torch.testing.assert_close(model.model.norm(ours[2]), ref.hidden_states[-1])
    torch.testing.assert_close(model.lm_head(model.model.norm(ours[2])), ref.logits)


def test_parameter_names_are_the_causal_lms(tiny_llama):
    wrapped = _wrap(tiny_llama)
    assert set(wrapped.state_dict()) == set(tiny_llama.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in tiny_llama.named_parameters()]


def test_no_dropout_in_eval_and_eval_reports_every_exit(tiny_llama):
    wrapped = _wrap(tiny_llama, p_max=0.9, depth="uniform").eval()
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0])) for layer in tiny_llama.model.layers]
    ids = torch.randint(0, 256, (4, 8))
    with torch.no_grad():
        out = wrapped(ids)
    for h in hooks:
        h.remove()
    assert calls == [4] * 4  # every layer on every row
    assert sorted(out.exit_losses) == [0, 1, 2, 3]
    torch.testing.assert_close(out.loss, tiny_llama(ids, labels=ids).loss)


def test_training_forward_skips_rows_per_the_masks(tiny_llama):
    wrapped = _wrap(tiny_llama, p_max=0.7, depth="linear").train()
    rows = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0])) for layer in tiny_llama.model.layers]
    ids = torch.randint(0, 256, (8, 8))
    out = wrapped(ids, step=5, micro_step=1)
    for h in hooks:
        h.remove()
    keep = out.kept_rows
    assert torch.equal(keep, wrapped.layer_dropout.sample_keep(5, 8, 1, 0))
    assert rows == [int(k.sum()) if k.any() else 1 for k in keep]  # all dropped: one stub token
    assert sum(rows) < 4 * 8


def test_gradients_reach_every_layer_within_a_few_steps():
    """With heavy layer dropout, every parameter of every layer still gets a gradient within a few steps."""
    model = make_random_model("llama", num_layers=6, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=64)
    wrapped = _wrap(model, p_max=0.6, curriculum="rotational", e_scale=0.2).train()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    reached = {n: False for n, _ in wrapped.named_parameters()}
    for step in range(4):
        wrapped.zero_grad()
        wrapped(ids, step=step).loss.backward()
        for n, p in wrapped.named_parameters():
            reached[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
    assert all(reached.values()), [n for n, ok in reached.items() if not ok]
