"""The forward engine against transformers' own forward: logits, early-exit logits, cache chunks."""
import pytest
import torch

from layerskip.errors import LayerSkipError
from layerskip.forward import LayerStack, exit_logits
from layerskip.kernels import KERNELS, TUNE_ROWS
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
    assert stack.kernels == (kernel,) * len(TUNE_ROWS)
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


def test_generate_keeps_no_state_behind():
    """No module-level cache: after generate, nothing holds the model; prepare() is the explicit way to reuse."""
    import gc
    import weakref

    import layerskip

    model = make_random_model("llama", num_layers=2, seed=9)
    layerskip.generate(model, [1, 2], max_new_tokens=2)
    engine = layerskip.prepare(model)
    assert layerskip.prepare(engine) is engine and engine.model is model
    del engine
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None




def test_exit_logits_is_norm_then_head(tiny_models):
    """The one definition of an exit's logits: final norm, then LM head (what LayerStack.logits computes)."""
    model = tiny_models["llama"]
    h = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    stack = LayerStack(model, kernel="linear")
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(h))
        torch.testing.assert_close(exit_logits(h, model.model.norm, model.lm_head.weight), expected)
        torch.testing.assert_close(stack.logits(h), expected)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "mistral-window"])
def test_packed_rows_equal_the_padded_pass(tiny_models, name):
    """run(..., lengths=) on ragged rows packed one after another (one row empty) gives each real token the
    hidden state and the K/V of the padded (B, T) pass, in every layer range."""
    model = tiny_models.get(name) or make_random_model("mistral", num_layers=4, num_kv_heads=2, head_dim=16,
                                                       sliding_window=6, seed=3)
    L, lengths, context = model.config.num_hidden_layers, [3, 0, 7, 1], [5, 9, 2, 12]
    stack = LayerStack(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 12 + 7), generator=g)
    pos = torch.tensor(context)
    caches = [stack.new_cache(32, batch=4) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:  # each row's context, packed
            stack.run(stack.embed(torch.cat([ids[b, :n] for b, n in enumerate(context)])), 0, L, cache,
                      torch.zeros(4, dtype=torch.long), lengths=context)
        new = torch.stack([ids[b, n:n + 7] for b, n in enumerate(context)])  # (4, 7)
        padded = stack.run(stack.embed(new), 0, L, caches[0], pos)  # (4, 7, H)
        packed_in = stack.embed(torch.cat([new[b, :n] for b, n in enumerate(lengths)]))
        h = stack.run(packed_in, 0, 2, caches[1], pos, lengths=lengths)
        packed = stack.run(h, 2, L, caches[1], pos, lengths=lengths)  # (11, H)
    assert packed.shape == (sum(lengths), padded.shape[-1])
    torch.testing.assert_close(packed, torch.cat([padded[b, :n] for b, n in enumerate(lengths)]), atol=1e-5,
                               rtol=1e-5)
    for layer in range(L):
        for b, (n, c) in enumerate(zip(lengths, context)):
            torch.testing.assert_close(caches[1].keys[layer][b, :, :c + n], caches[0].keys[layer][b, :, :c + n],
                                       atol=1e-5, rtol=1e-5)
