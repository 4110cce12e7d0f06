"""The early-exit loss: every active exit trained through the model's own final norm and LM head (section 4.2).

Terminology:
  h_l        the output of decoder layer l (0-based); h_{L-1} is the model's normal output (before the norm).
  exit l     head(norm(h_l)): the prediction made after the first l+1 layers.
  e(l)       the exit's scale:  e(l) = e_scale * sum_{i=0..l} i               for l < L-1,
                                e(L-1) = (L-1) + e_scale * sum_{i=0..L-2} i.
  w(t, l)    the exit's weight: C(t, l) e(l) / sum_i C(t, i) e(i), normalised over the active exits.
  J          sum_l w(t, l) * CE(head(norm(h_l)), y_l).
  y_l        exit l's targets: the next tokens of the data (the paper's loss, `exit_targets="labels"`), or, with
             `exit_targets="final"`, for l < L-1 the last layer's own greedy prediction argmax head(norm(h_{L-1}))
             (self-distillation; no gradient flows through it). The last layer always learns the data.
             Self-speculative decoding accepts a draft exactly when exit E's argmax equals the last layer's, so
             "final" trains the early exits on the quantity that decides acceptance.

The true final output h_{L-1} is always in the loss (torchtune's recipe feeds h_{L-2} as "the last layer").

Memory: logits are never alive for more than one chunk of tokens of one exit. `SharedHeadCrossEntropy`
computes each chunk's loss and, in the same pass, its gradient with respect to the exit's hidden state and the
head weight (softmax - one-hot, times the exit's weight); backward only scales those by the incoming gradient.
So the exits cost no extra memory beyond one (tokens, hidden) gradient each, and no recomputation.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100
EXIT_TARGETS = ("labels", "final")
_CHUNK_ELEMENTS = 2**22  # logits per chunk: 16 MiB in fp32


def exit_scales(num_layers: int, e_scale: float) -> list[float]:
    """e(l) for l = 0..L-1 (note e(0) = 0: the first layer's exit never carries weight).

    Example:
        >>> exit_scales(4, 0.5)  # [0.5*0, 0.5*(0+1), 0.5*(0+1+2), 3 + 0.5*(0+1+2)]
        [0.0, 0.5, 1.5, 4.5]
    """
    if not 0.0 <= e_scale <= 1.0:
        raise ValueError(f"early-exit scale must be in [0, 1], got {e_scale}")
    last = num_layers - 1
    scales = [e_scale * l * (l + 1) / 2 for l in range(last)]
    return scales + [last + e_scale * (last - 1) * last / 2 if last > 0 else 1.0]


def exit_weights(num_layers: int, active: list[int], e_scale: float) -> dict[int, float]:
    """w(t, l) for the active exits: e(l) normalised over them. `active` must contain L-1."""
    if num_layers - 1 not in active:
        raise ValueError("the last layer must be an active exit")
    e = exit_scales(num_layers, e_scale)
    total = sum(e[l] for l in active)
    return {l: e[l] / total for l in sorted(active)}


def early_exit_loss(
    hidden: dict[int, torch.Tensor],
    labels: torch.Tensor,
    norm: nn.Module,
    head_weight: torch.Tensor,
    weights: dict[int, float],
    chunk_tokens: int | None = None,
    exit_targets: str = "labels",
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """J = sum_l w_l CE(head(norm(h_l)), y_l), next-token targets (position i predicts labels[i + 1]).

    Args:
        hidden: {l: (B, T, H) output of layer l} for every exit in `weights`.
        labels: (B, T) token ids; IGNORE_INDEX (-100) marks positions not to predict.
        norm: the model's final norm (called as a module, so FSDP and hooks see it).
        head_weight: (V, H) the LM head's weight (no bias in the Llama family).
        weights: {l: w(t, l)}.
        chunk_tokens: tokens per logits chunk; default: 2^22 / V.
        exit_targets: "labels" (the data, for every exit) or "final" (exits before the last learn the last
            layer's argmax; see the module docstring).
    Returns:
        (J, {l: CE of exit l against its targets, detached}).
    """
    if exit_targets not in EXIT_TARGETS:
        raise ValueError(f"exit_targets must be one of {', '.join(EXIT_TARGETS)}, got {exit_targets!r}")
    layers = sorted(weights)
    targets = labels[:, 1:].reshape(-1)  # (N,) with N = B * (T - 1)
    xs = {l: norm(hidden[l][:, :-1]).reshape(targets.shape[0], -1) for l in layers}  # each (N, H)
    chunk = chunk_tokens or max(1, _CHUNK_ELEMENTS // head_weight.shape[0])
    need_grad = torch.is_grad_enabled() and (head_weight.requires_grad or any(x.requires_grad for x in xs.values()))
    last = max(layers)
    groups = [(layers, targets)]  # (exits, their targets (N,))
    early = [l for l in layers if l != last and weights[l] != 0.0]
    if exit_targets == "final" and early:
        predicted = greedy_targets(xs[last], head_weight, chunk)  # (N,)
        predicted = predicted.masked_fill(targets == IGNORE_INDEX, IGNORE_INDEX)
        groups = [(early, predicted), ([l for l in layers if l not in early], targets)]
    loss, per_exit = 0.0, {}
    for group, y in groups:
        part, losses = SharedHeadCrossEntropy.apply(
            head_weight, y, tuple(weights[l] for l in group), chunk, need_grad, *(xs[l] for l in group)
        )
        loss = loss + part
        per_exit.update({l: losses[i] for i, l in enumerate(group)})
    return loss, {l: per_exit[l] for l in layers}


@torch.no_grad()
def greedy_targets(x: torch.Tensor, head_weight: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmax_v (x W^T)_v for x (N, H) normed hidden states, in chunks of `chunk` rows: (N,) token ids."""
    return torch.cat([(x[s : s + chunk] @ head_weight.t()).argmax(-1) for s in range(0, x.shape[0], chunk)])


class SharedHeadCrossEntropy(torch.autograd.Function):
    """sum_k w_k CE(x_k W^T, y) over exits k sharing the head W, in token chunks, gradients formed in forward.

    forward(W (V, H), y (N,), w (K floats), chunk, need_grad, x_1..x_K (N, H) each) -> (J (), losses (K,))
    """

    @staticmethod
    def forward(ctx, weight, targets, exit_w, chunk, need_grad, *xs):
        valid = targets != IGNORE_INDEX  # (N,)
        safe_targets = targets.clamp(min=0)  # (N,)
        count = valid.sum().clamp(min=1)  # ()  tokens that count, no host sync
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros_like(weight) if need_grad and ctx.needs_input_grad[0] else None  # (V, H)
        grad_xs, losses = [], []
        for k, (x, w) in enumerate(zip(xs, exit_w)):
            want_x = need_grad and w != 0.0 and ctx.needs_input_grad[5 + k]
            grad_x = torch.empty_like(x) if want_x else None  # (N, H)
            total = torch.zeros((), dtype=acc, device=x.device)
            for s in range(0, x.shape[0], chunk):
                xc, tc, vc = x[s : s + chunk], safe_targets[s : s + chunk], valid[s : s + chunk]
                logits = (xc @ weight.t()).to(acc)  # (c, V)
                lse = torch.logsumexp(logits, dim=-1)  # (c,)
                picked = logits.gather(1, tc[:, None]).squeeze(1)  # (c,)
                total = total + ((lse - picked) * vc).sum()
                if not (want_x or (grad_w is not None and w != 0.0)):
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # (c, V) softmax, in place
                probs[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0  # softmax - one-hot
                probs.mul_((vc.to(acc) * w / count)[:, None])  # dJ/dlogits for this chunk
                g = probs.to(weight.dtype)
                if want_x:
                    grad_x[s : s + chunk] = g @ weight  # (c, H)
                if grad_w is not None:
                    grad_w.addmm_(g.t(), xc)  # (V, H)
            grad_xs.append(grad_x)
            losses.append(total / count)
        losses = torch.stack(losses)  # (K,)
        loss = (losses * torch.tensor(exit_w, dtype=losses.dtype, device=losses.device)).sum()
        ctx.has_grad_w = grad_w is not None
        ctx.grad_x_mask = [g is not None for g in grad_xs]
        ctx.save_for_backward(*([grad_w] if grad_w is not None else []), *[g for g in grad_xs if g is not None])
        ctx.mark_non_differentiable(losses)
        return loss.to(weight.dtype) if weight.dtype != acc else loss, losses.detach()

    @staticmethod
    def backward(ctx, grad_loss, _grad_losses):
        saved = list(ctx.saved_tensors)
        grad_w = saved.pop(0) * grad_loss if ctx.has_grad_w else None
        grad_xs = [saved.pop(0) * grad_loss if has else None for has in ctx.grad_x_mask]
        return (grad_w, None, None, None, None, *grad_xs)
