"""Layer dropout: p(l, t) = S(t) D(l) p_max against hand computation, per-sample masks, skipped compute."""
import math

import pytest
import torch

from layerskip.testing import make_random_model
from layerskip.training.layer_dropout import LayerDropout, depth_scale, mask_seed, run_on_rows, time_scale
from layerskip.training.model import causal_masks


@pytest.mark.parametrize("L", [2, 3, 5, 16])
def test_depth_scales_match_the_formulas(L):
    assert depth_scale(L, "exponential") == pytest.approx([2 ** (l / (L - 1)) - 1 for l in range(L)])
    assert depth_scale(L, "linear") == pytest.approx([l / (L - 1) for l in range(L)])
    assert depth_scale(L, "uniform") == [1.0] * L
    exp = depth_scale(L)
    assert exp[0] == 0.0 and exp[-1] == pytest.approx(1.0)


def test_depth_scale_by_hand():
    # L = 5: 2^(l/4) - 1
    assert depth_scale(5) == pytest.approx([0.0, 0.189207115, 0.414213562, 0.681792831, 1.0])
    assert depth_scale(1) == [0.0] and depth_scale(1, "uniform") == [1.0]


@pytest.mark.parametrize("t,T", [(0, 10), (3, 10), (9, 10), (12, 10), (0, 1), (50, 101)])
def test_time_scales_match_the_formulas(t, T):
    frac = min(t, T - 1) / (T - 1) if T > 1 else 1.0
    assert time_scale(t, T, "constant") == 1.0
    assert time_scale(t, T, "exponential") == pytest.approx(2**frac - 1 if T > 1 else 1.0)
    assert time_scale(t, T, "linear") == pytest.approx(frac)


@pytest.mark.parametrize("L,t,T", [(4, 0, 8), (4, 7, 8), (6, 3, 8), (16, 100, 1000), (2, 1, 3)])
@pytest.mark.parametrize("depth", ["exponential", "linear", "uniform"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "linear"])
def test_rates_are_s_times_d_times_pmax(L, t, T, depth, schedule):
    ld = LayerDropout(L, p_max=0.2, total_steps=T, depth=depth, schedule=schedule)
    s = time_scale(t, T, schedule)
    assert ld.rates(t) == pytest.approx([s * d * 0.2 for d in depth_scale(L, depth)])


def test_rates_by_hand():
    # L = 3, p_max 0.2, exponential D and S over T = 5 steps, t = 2: S = 2^(2/4) - 1
    ld = LayerDropout(3, 0.2, total_steps=5, depth="exponential", schedule="exponential")
    s = math.sqrt(2) - 1
    assert ld.rates(2) == pytest.approx([0.0, s * (math.sqrt(2) - 1) * 0.2, s * 1.0 * 0.2])
    assert ld.rates(0) == [0.0, 0.0, 0.0]  # from scratch: no dropout at the first step
    assert ld.rates(4) == pytest.approx([0.0, (math.sqrt(2) - 1) * 0.2, 0.2])


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_p_max_outside_0_1_is_rejected(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LayerDropout(4, p)


def test_unknown_scale_names_are_rejected():
    with pytest.raises(ValueError):
        LayerDropout(4, 0.1, depth="cubic")
    with pytest.raises(ValueError):
        LayerDropout(4, 0.1, schedule="cosine")


def test_masks_are_per_sample_deterministic_and_follow_the_rates():
    ld = LayerDropout(4, 0.8, depth="linear")  # rates 0, 0.267, 0.533, 0.8
    keep = ld.sample_keep(step=3, batch_size=4000)
    assert keep.shape == (4, 4000) and keep.dtype == torch.bool
    assert torch.equal(keep, ld.sample_keep(step=3, batch_size=4000))  # same (step, micro, rank): same masks
    assert not torch.equal(keep, ld.sample_keep(step=4, batch_size=4000))
    assert not torch.equal(keep, ld.sample_keep(step=3, batch_size=4000, rank=1))
    drop = 1 - keep.float().mean(1)
    assert drop.tolist() == pytest.approx(ld.rates(3), abs=0.03)
    assert keep[0].all()  # p(0, t) = 0
    # rows differ within a batch: dropout is per sample, not per batch
    assert 0 < keep[3].sum() < 4000
    assert mask_seed(0, 1, 0, 0) != mask_seed(0, 0, 1, 0) != mask_seed(0, 0, 0, 1)


def _layer_setup(batch=4, seq=6):
    model = make_random_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=50)
    model.train()
    layer = model.model.layers[1]
    h = torch.randn(batch, seq, 32, requires_grad=True)
    pos = torch.arange(seq)[None]
    kwargs = dict(
        attention_mask=causal_masks(model.config, h, pos)[1], position_ids=pos,
        position_embeddings=model.model.rotary_emb(h, pos),
    )
    return layer, h, kwargs


def test_dropped_rows_pass_through_unchanged_and_get_no_compute():
    layer, h, kwargs = _layer_setup()
    rows_seen = []
    hook = layer.register_forward_pre_hook(lambda mod, args: rows_seen.append(args[0].shape[0]))
    keep = torch.tensor([True, False, True, False])
    out = run_on_rows(layer, h, keep, **kwargs)
    hook.remove()
    assert rows_seen == [2]  # the layer ran on the two kept rows only
    assert torch.equal(out[1], h[1]) and torch.equal(out[3], h[3])
    full = layer(h, **kwargs)
    torch.testing.assert_close(out[[0, 2]], full[[0, 2]])


def test_all_rows_kept_is_the_plain_layer():
    layer, h, kwargs = _layer_setup()
    out = run_on_rows(layer, h, torch.ones(4, dtype=torch.bool), **kwargs)
    assert torch.equal(out, layer(h, **kwargs))


def test_all_rows_dropped_costs_one_token_and_keeps_parameters_in_the_graph():
    layer, h, kwargs = _layer_setup()
    shapes = []
    hook = layer.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape[:2])))
    out = run_on_rows(layer, h, torch.zeros(4, dtype=torch.bool), **kwargs)
    hook.remove()
    assert shapes == [(1, 1)]
    assert torch.equal(out, h)
    out.sum().backward()
    for p in layer.parameters():  # a zero gradient, not None: DDP sees every parameter used
        assert p.grad is not None and not p.grad.any()
    assert torch.equal(h.grad, torch.ones_like(h))  # the rows passed straight through
