"""The one KV cache: writes, bounds, and rollback equal to what autoregressive decoding holds."""
import pytest
import torch

from layerskip.cache import KVCache
from layerskip.decoding.autoregressive import decode_autoregressive
from layerskip.decoding.result import GenerationStats
from layerskip.decoding.sampling import SamplingParams
from layerskip.decoding.self_speculative import decode_self_speculative
from layerskip.decoding.stopping import StopChecker
from layerskip.forward import LayerStack


def test_write_returns_prefix_and_crop_rolls_back():
    c = KVCache(2, 1, 2, 8, 4, dtype=torch.float32, device="cpu")
    k = torch.ones(1, 2, 3, 4)
    keys, values = c.write(0, 0, k, 2 * k)
    assert keys.shape == (1, 2, 3, 4) and c.valid == [3, 0]
    c.write(0, 3, 3 * k[:, :, :2], k[:, :, :2])
    c.crop(4)
    assert c.valid == [4, 0]
    keys, _ = c.write(0, 4, 5 * k[:, :, :1], k[:, :, :1])  # overwrite the stale position 4
    assert keys.shape[2] == 5 and float(keys[0, 0, 4, 0]) == 5.0


def test_write_past_valid_or_size_is_an_error():
    c = KVCache(1, 1, 1, 4, 2, dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError):
        c.write(0, 1, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))  # gap: nothing at position 0
    c.write(0, 0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    with pytest.raises(RuntimeError):
        c.write(0, 4, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


@pytest.mark.parametrize("exit_layer,d", [(1, 3), (2, 5), (3, 1)])
def test_cache_after_self_speculation_equals_autoregressive(tiny_llama, exit_layer, d):
    """After rounds with rejections and rollbacks, every layer's valid K/V equal an AR run's."""
    stack = LayerStack(tiny_llama)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(exit_layer))
    n = 25
    caches = [stack.new_cache(6 + n), stack.new_cache(6 + n)]
    with torch.inference_mode():
        ar = decode_autoregressive(stack, prompt, num_layers=4, params=SamplingParams(), stopper=StopChecker(n),
                                   stats=GenerationStats("autoregressive"), cache=caches[0])
        stats = GenerationStats("self_speculative")
        ss = decode_self_speculative(stack, prompt, exit_layer=exit_layer, num_speculations=d, params=SamplingParams(),
                                     stopper=StopChecker(n), stats=stats, cache=caches[1])
    assert ss == ar
    assert stats.accepted < stats.drafted  # the random model rejects: rollback happened
    ar_cache, ss_cache = caches
    # AR caches every token but the last emitted one; so must self-speculation (after its last crop,
    # positions past the kept ones may hold stale drafts, which are never read).
    kept = 6 + n - 1
    assert ar_cache.valid == [kept] * 4
    for layer in range(4):
        assert ss_cache.valid[layer] >= kept
        torch.testing.assert_close(ss_cache.keys[layer][:, :, :kept], ar_cache.keys[layer][:, :, :kept],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ss_cache.values[layer][:, :, :kept], ar_cache.values[layer][:, :, :kept],
                                   atol=1e-5, rtol=1e-4)
