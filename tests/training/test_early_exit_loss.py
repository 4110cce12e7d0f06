"""The early-exit loss against a hand computation from transformers' own hidden states."""
import pytest
import torch
import torch.nn.functional as F

from layerskip.forward import exit_logits
from layerskip.testing import make_random_model
from layerskip.training.curriculum import Curriculum
from layerskip.training.early_exit_loss import early_exit_loss, exit_scales, exit_weights
from layerskip.training.layer_dropout import LayerDropout
from layerskip.training.model import LayerSkipModel


@pytest.mark.parametrize("L", [2, 4, 7, 32])
@pytest.mark.parametrize("e_scale", [0.0, 0.2, 1.0])
def test_exit_scales_match_the_formula(L, e_scale):
    e = exit_scales(L, e_scale)
    for l in range(L - 1):
        assert e[l] == pytest.approx(e_scale * sum(range(l + 1)))
    assert e[L - 1] == pytest.approx((L - 1) + e_scale * sum(range(L - 1)))


def test_exit_scales_and_weights_by_hand():
    assert exit_scales(4, 0.5) == [0.0, 0.5, 1.5, 4.5]
    assert exit_weights(4, [0, 1, 2, 3], 0.5) == pytest.approx({0: 0, 1: 0.5 / 6.5, 2: 1.5 / 6.5, 3: 4.5 / 6.5})
    assert exit_weights(4, [1, 3], 0.5) == pytest.approx({1: 0.1, 3: 0.9})
    # L = 6, e_scale 0.2, rotational R = 2 at t = 1: exits 1, 3, 5 -> e = 0.2, 1.2, 5 + 0.2*10 = 7
    active = Curriculum("rotational", 6, rotation=2).active(1)
    assert exit_weights(6, active, 0.2) == pytest.approx({1: 0.2 / 8.4, 3: 1.2 / 8.4, 5: 7 / 8.4})
    assert exit_weights(4, [3], 1.0) == {3: 1.0}
    assert exit_weights(1, [0], 0.3) == {0: 1.0}


def test_explicit_scales_replace_the_formula():
    # e = [0, 1, 1, 2]: normalised over the active exits, e_scale ignored
    assert exit_weights(4, [0, 1, 2, 3], 0.5, [0, 1, 1, 2]) == pytest.approx({0: 0, 1: 0.25, 2: 0.25, 3: 0.5})
    assert exit_weights(4, [1, 3], 0.9, [0, 1, 1, 2]) == pytest.approx({1: 1 / 3, 3: 2 / 3})
    with pytest.raises(ValueError, match="expected 4 numbers"):
        exit_weights(4, [1, 3], 0.5, [1, 1, 2])
    with pytest.raises(ValueError, match="last layer's > 0"):
        exit_weights(4, [1, 3], 0.5, [0, 1, 1, 0])
    with pytest.raises(ValueError, match=">= 0"):
        exit_weights(4, [1, 3], 0.5, [0, -1, 1, 1])


def test_weights_need_the_last_layer_and_a_valid_scale():
    with pytest.raises(ValueError, match="last layer"):
        exit_weights(4, [0, 1, 2], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        exit_scales(4, 1.5)


def _reference_loss(model, ids, weights):
    """Slow and obvious: transformers' hidden states, a full logits tensor per exit, F.cross_entropy."""
    out = model(ids, output_hidden_states=True)
    L = model.config.num_hidden_layers
    total = 0.0
    losses = {}
    for l, w in weights.items():
        # hidden_states[l + 1] is layer l's raw output for l < L-1; hidden_states[-1] is already normed.
        # exit_logits: the one definition of an exit's logits, which decoding uses too
        logits = out.logits if l == L - 1 else exit_logits(out.hidden_states[l + 1], model.model.norm,
                                                           model.lm_head.weight)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        losses[l] = ce
        total = total + w * ce
    return total, losses


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "mistral", "qwen2", "qwen3"])
def test_loss_and_gradients_equal_the_hand_computation(tiny_models, arch):
    model = tiny_models[arch]
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    wrapped = LayerSkipModel(model, LayerDropout(L, 0.0), Curriculum("none", L), early_exit_scale=0.5)
    wrapped.train()
    weights = exit_weights(L, list(range(L)), 0.5)
    out = wrapped(ids, step=0)
    ref, ref_losses = _reference_loss(model, ids, weights)
    torch.testing.assert_close(out.loss, ref)
    for l in range(L):
        torch.testing.assert_close(out.exit_losses[l], ref_losses[l])
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(out.loss, params)
    want = torch.autograd.grad(ref, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_the_true_final_output_is_in_the_loss(tiny_llama):
    L = tiny_llama.config.num_hidden_layers
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    wrapped = LayerSkipModel(tiny_llama, LayerDropout(L, 0.0), Curriculum("rotational", L, rotation=2), 0.3).train()
    for t in range(4):
        out = wrapped(ids, step=t)
        assert L - 1 in out.exit_losses
    # last-layer exit == transformers' own causal-LM loss (the real final output, not layer L-2's)
    torch.testing.assert_close(out.exit_losses[L - 1], tiny_llama(ids, labels=ids).loss)


def test_chunked_equals_unchunked_with_ignored_targets():
    torch.manual_seed(0)
    V, H = 37, 8
    head = torch.randn(V, H, requires_grad=True)
    norm = torch.nn.LayerNorm(H)
    hidden = {0: torch.randn(2, 9, H, requires_grad=True), 2: torch.randn(2, 9, H, requires_grad=True)}
    labels = torch.randint(0, V, (2, 9))
    labels[0, 3:6] = -100
    weights = {0: 0.25, 2: 0.75}
    results = []
    for chunk in (None, 1, 5):
        loss, per_exit, _ = early_exit_loss(hidden, labels, norm, head, weights, chunk_tokens=chunk)
        grads = torch.autograd.grad(loss, [head, hidden[0], hidden[2]])
        results.append((loss, per_exit, grads))
    # reference: plain autograd with ignore_index
    ref = 0
    for l, w in weights.items():
        logits = exit_logits(hidden[l][:, :-1], norm, head)
        ref = ref + w * F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [head, hidden[0], hidden[2]])
    for loss, per_exit, grads in results:
        torch.testing.assert_close(loss, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)


def test_zero_weight_exit_is_reported_but_gets_no_gradient():
    torch.manual_seed(0)
    head = torch.randn(11, 4, requires_grad=True)
    h0 = torch.randn(1, 5, 4, requires_grad=True)
    h1 = torch.randn(1, 5, 4, requires_grad=True)
    loss, per_exit, _ = early_exit_loss({0: h0, 1: h1}, torch.randint(0, 11, (1, 5)), torch.nn.Identity(), head,
                                     {0: 0.0, 1: 1.0})
    assert per_exit[0] > 0
    g0, g1 = torch.autograd.grad(loss, [h0, h1], allow_unused=True)
    assert g0 is None or not g0.any()
    assert g1.abs().sum() > 0


@pytest.mark.parametrize("extra", [{}, dict(exit_targets="final", unlikelihood=0.5)])
def test_double_precision_gradcheck(extra):
    torch.manual_seed(0)
    head = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 4))  # few ids: the unlikelihood's context repeats them

    def fn(head, h, g):
        return early_exit_loss({1: h, 3: g}, labels, torch.nn.Identity(), head, {1: 0.3, 3: 0.7}, chunk_tokens=2,
                               **extra)[0]

    assert torch.autograd.gradcheck(fn, (head, h, g))


def _reference_self_distillation(model, ids, weights, soft=False):
    """Slow and obvious: exits before the last against the last layer's argmax (soft: its softmax), the last
    against the data."""
    out = model(ids, output_hidden_states=True)
    L = model.config.num_hidden_layers
    last = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).detach()  # the last layer's own next-token scores
    teacher = last.softmax(-1) if soft else last.argmax(-1)
    total, losses = 0.0, {}
    for l, w in weights.items():
        logits = out.logits if l == L - 1 else model.lm_head(model.model.norm(out.hidden_states[l + 1]))
        targets = ids[:, 1:].reshape(-1) if l == L - 1 or w == 0 else teacher
        losses[l] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets)
        total = total + w * losses[l]
    return total, losses


@pytest.mark.parametrize("arch,targets", [("llama-tied", "final"), ("qwen3", "final"), ("llama-tied", "final-soft"),
                                          ("mistral", "final-soft")])
def test_self_distillation_equals_the_hand_computation(tiny_models, arch, targets):
    model = tiny_models[arch]
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    wrapped = LayerSkipModel(model, LayerDropout(L, 0.0), Curriculum("none", L), early_exit_scale=1.0,
                             exit_targets=targets).train()
    weights = exit_weights(L, list(range(L)), 1.0)  # exit 0 has weight 0: reported against the data
    out = wrapped(ids, step=0)
    ref, ref_losses = _reference_self_distillation(model, ids, weights, soft=targets == "final-soft")
    torch.testing.assert_close(out.loss, ref)
    for l in range(L):
        torch.testing.assert_close(out.exit_losses[l], ref_losses[l])
    params = list(model.parameters())
    for g, w in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    # it differs from the paper's loss (the targets really changed), and evaluation scores against the data
    paper, _ = _reference_loss(model, ids, weights)
    assert not torch.allclose(out.loss, paper)
    with torch.no_grad():
        evaluated = wrapped.eval()(ids)
    torch.testing.assert_close(evaluated.exit_losses[0], _reference_loss(model, ids, {0: 1.0})[1][0])


def test_self_distillation_keeps_ignored_positions_out():
    torch.manual_seed(0)
    V, H = 23, 6
    head = torch.randn(V, H, requires_grad=True)
    hidden = {1: torch.randn(2, 8, H, requires_grad=True), 3: torch.randn(2, 8, H, requires_grad=True)}
    labels = torch.randint(0, V, (2, 8))
    labels[1, 2:5] = -100
    weights = {1: 0.4, 3: 0.6}
    loss, _, _ = early_exit_loss(hidden, labels, torch.nn.Identity(), head, weights, chunk_tokens=3,
                              exit_targets="final")
    y = labels[:, 1:].reshape(-1)
    greedy = (hidden[3][:, :-1].reshape(-1, H) @ head.t()).argmax(-1).masked_fill(y == -100, -100)
    ref = (0.4 * F.cross_entropy(hidden[1][:, :-1].reshape(-1, H) @ head.t(), greedy, ignore_index=-100)
           + 0.6 * F.cross_entropy(hidden[3][:, :-1].reshape(-1, H) @ head.t(), y, ignore_index=-100))
    torch.testing.assert_close(loss, ref)
    with pytest.raises(ValueError, match="exit_targets"):
        early_exit_loss(hidden, labels, torch.nn.Identity(), head, weights, exit_targets="soft")


def test_soft_and_hard_self_distillation_chunked_with_ignored_positions():
    torch.manual_seed(1)
    V, H = 19, 5
    head = torch.randn(V, H, requires_grad=True)
    hidden = {0: torch.randn(2, 7, H, requires_grad=True), 2: torch.randn(2, 7, H, requires_grad=True),
              4: torch.randn(2, 7, H, requires_grad=True)}
    labels = torch.randint(0, V, (2, 7))
    labels[0, 1:4] = -100
    weights = {0: 0.2, 2: 0.3, 4: 0.5}
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    last = (hidden[4][:, :-1].reshape(-1, H) @ head.t()).detach()
    for targets, teacher in (("final", last.argmax(-1)), ("final-soft", last.softmax(-1))):
        ref = 0.5 * F.cross_entropy(hidden[4][:, :-1].reshape(-1, H) @ head.t(), y, ignore_index=-100)
        for l in (0, 2):
            logits = hidden[l][:, :-1].reshape(-1, H) @ head.t()
            ref = ref + weights[l] * F.cross_entropy(logits[keep], teacher[keep])
        ref_grads = torch.autograd.grad(ref, [head, *hidden.values()])
        for chunk in (None, 1, 4):
            loss, _, _ = early_exit_loss(hidden, labels, torch.nn.Identity(), head, weights, chunk_tokens=chunk,
                                      exit_targets=targets)
            torch.testing.assert_close(loss, ref)
            for g, r in zip(torch.autograd.grad(loss, [head, *hidden.values()]), ref_grads):
                torch.testing.assert_close(g, r)


def _reference_unlikelihood(logits, labels, eps=1e-5):
    """Slow and obvious: for each position i that predicts labels[b, i + 1], -sum log(1 - p(c)) over the distinct
    valid tokens c of labels[b, :i + 1] other than labels[b, i + 1]; the mean over the valid positions."""
    B, T = labels.shape
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T - 1):
            y = int(labels[b, i + 1])
            if y == -100:
                continue
            count += 1
            p = logits[b, i].softmax(-1)
            for c in {int(t) for t in labels[b, : i + 1] if int(t) != -100} - {y}:
                total = total - torch.log(torch.clamp(1 - p[c], min=eps))
    return total / max(count, 1)


@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_unlikelihood_equals_the_hand_computation(chunk):
    torch.manual_seed(0)
    V, H = 13, 6
    head = torch.randn(V, H, requires_grad=True)
    norm = torch.nn.LayerNorm(H)
    hidden = {1: torch.randn(2, 9, H, requires_grad=True), 3: torch.randn(2, 9, H, requires_grad=True)}
    labels = torch.randint(0, 5, (2, 9))  # few ids: the context repeats them
    labels[1, 2:4] = -100
    weights, alpha = {1: 0.4, 3: 0.6}, 0.7
    loss, per_exit, unlikely = early_exit_loss(hidden, labels, norm, head, weights, chunk_tokens=chunk,
                                               unlikelihood=alpha)
    ref = 0
    for l, w in weights.items():
        logits = exit_logits(hidden[l][:, :-1], norm, head)
        ref = ref + w * F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    ul = _reference_unlikelihood(exit_logits(hidden[3], norm, head), labels)
    assert ul > 0
    ref = ref + alpha * weights[3] * ul
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(unlikely, ul.detach())  # reported on its own, before alpha and the exit's weight
    # the per-exit losses stay the cross-entropies
    plain, plain_exits, off = early_exit_loss(hidden, labels, norm, head, weights, chunk_tokens=chunk)
    assert off is None
    for l in weights:
        torch.testing.assert_close(per_exit[l], plain_exits[l])
    assert loss > plain
    got = torch.autograd.grad(loss, [head, hidden[1], hidden[3]])
    want = torch.autograd.grad(ref, [head, hidden[1], hidden[3]])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_unlikelihood_only_while_training(tiny_llama):
    L = tiny_llama.config.num_hidden_layers
    ids = torch.randint(0, 8, (2, 10), generator=torch.Generator().manual_seed(2))
    plain = LayerSkipModel(tiny_llama, LayerDropout(L, 0.0), Curriculum("none", L), 0.3)
    ul = LayerSkipModel(tiny_llama, LayerDropout(L, 0.0), Curriculum("none", L), 0.3, unlikelihood=1.0)
    assert ul.train()(ids).loss > plain.train()(ids).loss
    torch.testing.assert_close(ul.eval()(ids).loss, plain.eval()(ids).loss)
