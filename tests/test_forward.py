"""The forward engine against transformers' own forward: logits, early-exit logits, cache chunks."""
import pytest
import torch

from layerskip.errors import LayerSkipError
from layerskip.forward import KERNELS, TUNE_ROWS, LayerStack, PackedWeights, matmul, onednn_available
from layerskip.testing import make_random_model


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3"])
def test_logits_match_transformers_in_chunks(tiny_models, name, kernel):
    """Prefill 11 tokens, then 1, then 6, through split layer ranges: equals one full forward, with each
    few-row matmul kernel."""
    model = tiny_models[name]
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 18), generator=torch.Generator().manual_seed(0))
    stack = LayerStack(model, kernel=kernel)
    assert stack.kernels == (kernel,) * len(TUNE_ROWS) and stack.tune() == stack.kernels  # fixed: no tuning
    cache = stack.new_cache(32)
    with torch.no_grad():
        ref = model(ids).logits[0]
        a = stack.logits(stack.run(stack.embed(ids[:, :11]), 0, L, cache, 0))
        h = stack.run(stack.embed(ids[:, 11:12]), 0, 1, cache, 11)
        b = stack.logits(stack.run(h, 1, L, cache, 11))
        c = stack.logits(stack.run(stack.embed(ids[:, 12:]), 0, L, cache, 12))
    ours = torch.cat([a, b, c], 1)[0]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_sliding_window_matches_transformers():
    model = make_random_model("mistral", num_layers=3, num_kv_heads=2, head_dim=16, sliding_window=5, seed=7)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    stack = LayerStack(model)
    cache = stack.new_cache(20)
    with torch.no_grad():
        ref = model(ids).logits[0]
        a = stack.logits(stack.run(stack.embed(ids[:, :9]), 0, 3, cache, 0))
        rest = [stack.logits(stack.run(stack.embed(ids[:, t:t + 1]), 0, 3, cache, t)) for t in range(9, 20)]
    torch.testing.assert_close(torch.cat([a, *rest], 1)[0], ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_early_exit_logits_equal_hand_computation(tiny_models, name):
    """Exit E = norm + head on transformers' hidden_states[E] (the raw output of layer E-1)."""
    model = tiny_models[name]
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    stack = LayerStack(model)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # L + 1 entries; the last is normed
        for E in range(1, L):
            expected = model.lm_head(model.model.norm(hidden[E]))
            got = stack.logits(stack.run(stack.embed(ids), 0, E, stack.new_cache(9), 0))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_unsupported_architecture_names_the_supported_ones():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(LayerSkipError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        LayerStack(transformers.GPT2LMHeadModel(config))


def test_cached_stack_does_not_keep_the_model_alive():
    import gc
    import weakref

    import layerskip
    from layerskip.decoding.api import _stacks

    model = make_random_model("llama", num_layers=2, seed=9)
    layerskip.generate(model, [1, 2], max_new_tokens=2)
    assert model in _stacks
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_tune_picks_a_kernel_per_row_count_once(tiny_llama):
    """`tune` times the kernels and keeps its choice; a tuned stack still matches transformers."""
    stack = LayerStack(tiny_llama)
    assert stack.kernels == ("wxt",) * len(TUNE_ROWS) and not stack.tuned  # on CPU, W @ x.T until tuned
    choice = stack.tune(reps=1)
    assert stack.tuned and choice == stack.kernels and all(c in KERNELS for c in choice)
    stack.kernels = ("linear" if choice[0] != "linear" else "wxt", *choice[1:])
    assert stack.tune() == stack.kernels  # not re-timed
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    L = tiny_llama.config.num_hidden_layers
    with torch.no_grad():
        ref = tiny_llama(ids).logits[0]
        cache = stack.new_cache(7)
        a = stack.logits(stack.run(stack.embed(ids[:, :3]), 0, L, cache, 0))
        b = [stack.logits(stack.run(stack.embed(ids[:, t:t + 1]), 0, L, cache, t)) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat([a, *b], 1)[0], ref, atol=2e-5, rtol=1e-4)


def test_each_row_count_uses_its_buckets_kernel(tiny_llama):
    stack = LayerStack(tiny_llama, kernel="linear")
    stack.kernels = ("wxt", "linear", "onednn", "linear")  # buckets starting at TUNE_ROWS = (1, 2, 4, 8)
    assert TUNE_ROWS == (1, 2, 4, 8)
    assert [stack._route(r) for r in range(1, 13)] == ["wxt", "linear", "linear"] + ["onednn"] * 4 + ["linear"] * 5


def test_unknown_kernel_is_an_error(tiny_llama):
    with pytest.raises(LayerSkipError, match="unknown matmul kernel"):
        LayerStack(tiny_llama, kernel="blas")


def test_reordered_weights_follow_in_place_changes():
    """The "onednn" kernel's reordered copy is remade when the weight changes (training between decodes)."""
    if not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 24, generator=gen), torch.randn(40, 24, generator=gen)
    packed = PackedWeights()
    torch.testing.assert_close(matmul(x, w, None, "onednn", packed), x @ w.T)
    with torch.no_grad():
        w.mul_(2)
    torch.testing.assert_close(matmul(x, w, None, "onednn", packed), x @ w.T)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 12, 13])
@pytest.mark.parametrize("kernel", KERNELS)
def test_matmul_equals_linear_and_is_contiguous(rows, kernel):
    """Each kernel gives F.linear's result in a plain row-major layout: a transposed view would be inherited
    by every op after it (the next matmul and attention over several queries then take much slower paths)."""
    gen = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(1, rows, 24, generator=gen), torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    for bias in (None, b):
        y = matmul(x, w, bias, kernel, PackedWeights())
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias))
        assert y.is_contiguous()
