"""The few-row matmul kernels and their tuning (layerskip.kernels)."""
import pytest
import torch

from layerskip.errors import LayerSkipError
from layerskip.forward import LayerStack
from layerskip.kernels import KERNELS, TUNE_ROWS, PackedWeights, matmul, onednn_available, route, tune


def test_tune_picks_a_kernel_per_row_count(tiny_llama):
    """`tune` times the kernels and sets its choice; a tuned stack still matches transformers."""
    stack = LayerStack(tiny_llama)
    assert stack.kernels == ("wxt",) * len(TUNE_ROWS)  # on CPU, W @ x.T until tuned
    choice = tune(stack, reps=1)
    assert choice == stack.kernels and all(c in KERNELS for c in choice)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    L = tiny_llama.config.num_hidden_layers
    with torch.no_grad():
        ref = tiny_llama(ids).logits[0]
        cache = stack.new_cache(7)
        a = stack.logits(stack.run(stack.embed(ids[:, :3]), 0, L, cache, 0))
        b = [stack.logits(stack.run(stack.embed(ids[:, t:t + 1]), 0, L, cache, t)) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat([a, *b], 1)[0], ref, atol=2e-5, rtol=1e-4)


def test_each_row_count_uses_its_buckets_kernel():
    kernels = ("wxt", "linear", "onednn", "linear", "onednn", "linear", "onednn")
    assert TUNE_ROWS == (1, 2, 4, 8, 16, 32, 64)
    assert [route(kernels, r) for r in range(1, 13)] == ["wxt", "linear", "linear"] + ["onednn"] * 4 + ["linear"] * 5
    assert [route(kernels, r) for r in (15, 16, 31, 32, 63, 64, 500)] == ["linear", "onednn", "onednn", "linear",
                                                                           "linear", "onednn", "onednn"]


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


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 12, 13, 72])
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


def test_tuned_choice_is_recorded_in_stats(tiny_llama):
    import layerskip

    engine = layerskip.prepare(tiny_llama, tune=True)
    out = layerskip.generate(engine, [1, 2, 3], max_new_tokens=3)
    assert out.stats.matmul_kernels == engine.kernels
    assert layerskip.prepare(tiny_llama, kernel="linear").kernels == ("linear",) * len(TUNE_ROWS)
