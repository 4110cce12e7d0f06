"""The early-exit loss: every active exit trained through the model's own final norm and LM head (section 4.2).

Terminology:
  h_l        the output of decoder layer l (0-based); h_{L-1} is the model's normal output (before the norm).
  exit l     head(norm(h_l)): the prediction made after the first l+1 layers.
  e(l)       the exit's scale:  e(l) = e_scale * sum_{i=0..l} i               for l < L-1,
                                e(L-1) = (L-1) + e_scale * sum_{i=0..L-2} i.
  w(t, l)    the exit's weight: C(t, l) e(l) / sum_i C(t, i) e(i), normalised over the active exits.
  J          sum_l w(t, l) * CE(head(norm(h_l)), y).

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
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """J = sum_l w_l CE(head(norm(h_l)), y), next-token targets (position i predicts labels[i + 1]).

    Args:
        hidden: {l: (B, T, H) output of layer l} for every exit in `weights`.
        labels: (B, T) token ids; IGNORE_INDEX (-100) marks positions not to predict.
        norm: the model's final norm (called as a module, so FSDP and hooks see it).
        head_weight: (V, H) the LM head's weight (no bias in the Llama family).
        weights: {l: w(t, l)}.
        chunk_tokens: tokens per logits chunk; default: 2^22 / V.
    Returns:
        (J, {l: CE of exit l, detached}).
    """
    layers = sorted(weights)
    targets = labels[:, 1:].reshape(-1)  # (N,) with N = B * (T - 1)
    xs = [norm(hidden[l][:, :-1]).reshape(targets.shape[0], -1) for l in layers]  # each (N, H)
    chunk = chunk_tokens or max(1, _CHUNK_ELEMENTS // head_weight.shape[0])
    need_grad = torch.is_grad_enabled() and (head_weight.requires_grad or any(x.requires_grad for x in xs))
    loss, per_exit = SharedHeadCrossEntropy.apply(
        head_weight, targets, tuple(weights[l] for l in layers), chunk, need_grad, *xs
    )
    return loss, {l: per_exit[i] for i, l in enumerate(layers)}


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
