"""The early-exit loss: every active exit trained through the model's own final norm and LM head (section 4.2).

Terminology:
  h_l        the output of decoder layer l (0-based); h_{L-1} is the model's normal output (before the norm).
  exit l     head(norm(h_l)): the prediction made after the first l+1 layers (`layerskip.forward.exit_logits`, the
             definition decoding uses; here the norm runs once per exit and the head's matmul in token chunks
             inside the fused cross-entropy below, which needs the normed input for the head's gradient).
  e(l)       the exit's scale:  e(l) = e_scale * sum_{i=0..l} i               for l < L-1,
                                e(L-1) = (L-1) + e_scale * sum_{i=0..L-2} i.
  w(t, l)    the exit's weight: C(t, l) e(l) / sum_i C(t, i) e(i), normalised over the active exits.
  J          sum_l w(t, l) * CE(head(norm(h_l)), y_l).
  y_l        exit l's targets: the next tokens of the data (the paper's loss, `exit_targets="labels"`), or, for
             l < L-1, the last layer's own prediction (self-distillation; held constant, no gradient flows through
             it): its argmax head(norm(h_{L-1})) with `exit_targets="final"`, its whole distribution
             softmax(head(norm(h_{L-1}))) with "final-soft" (CE against it = KL + the last layer's entropy).
             The last layer always learns the data. Self-speculative decoding accepts a draft exactly when exit
             E's argmax equals the last layer's, so both train the early exits on the quantity that decides
             acceptance; the soft one gives each token the last layer's ranking of every alternative.

The true final output h_{L-1} is always in the loss (torchtune's recipe feeds h_{L-2} as "the last layer").

Unlikelihood (optional, the last exit only; Welleck et al., ICLR 2020, "token-level"): alpha * w(t, L-1) * UL with
  UL = mean over positions i of  - sum_{c in C_i} log(1 - p_i(c)),   C_i = {tokens of the row up to i} - {y_i},
which pushes down the tokens the context already holds, except the true next one: greedy decoding of a small model
then loops less (repeating the context is what it is taught against), at a small cost in perplexity. 0 = off.

Memory: logits are never alive for more than one chunk of tokens of one exit (plus the teacher's, when
distilling). `SharedHeadCrossEntropy` computes each chunk's loss and, in the same pass, its gradient with respect
to the exit's hidden state and the head weight (softmax - target, times the exit's weight); backward only scales
those by the incoming gradient. The last exit is computed first in each chunk, so its logits serve as the
distillation teacher too, and the head runs once per exit per token.
So the exits cost no extra memory beyond one (tokens, hidden) gradient each, and no recomputation.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100
EXIT_TARGETS = ("labels", "final", "final-soft")
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


def check_scales(scales: list[float], num_layers: int | None = None) -> list[float]:
    """Explicit per-exit scales e(0..L-1): non-negative numbers, the last one positive; L of them, when given."""
    if num_layers is not None and len(scales) != num_layers:
        raise ValueError(f"expected {num_layers} numbers (one per layer), got {len(scales)}")
    if not scales or any(not w >= 0 for w in scales) or not scales[-1] > 0:
        raise ValueError("every weight must be >= 0, and the last layer's > 0")
    return [float(w) for w in scales]


def exit_weights(num_layers: int, active: list[int], e_scale: float,
                 scales: list[float] | None = None) -> dict[int, float]:
    """w(t, l) for the active exits: e(l) normalised over them. `active` must contain L-1.

    `scales`: explicit e(l) for l = 0..L-1 in place of the paper's formula (e.g. weight on the shallow exits a
    drafter uses); `e_scale` is then unused.
    """
    if num_layers - 1 not in active:
        raise ValueError("the last layer must be an active exit")
    e = exit_scales(num_layers, e_scale) if scales is None else check_scales(scales, num_layers)
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
    unlikelihood: float = 0.0,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """J = sum_l w_l CE(head(norm(h_l)), y_l), next-token targets (position i predicts labels[i + 1]).

    Args:
        hidden: {l: (B, T, H) output of layer l} for every exit in `weights`.
        labels: (B, T) token ids; IGNORE_INDEX (-100) marks positions not to predict.
        norm: the model's final norm (called as a module, so FSDP and hooks see it).
        head_weight: (V, H) the LM head's weight (no bias in the Llama family).
        weights: {l: w(t, l)}.
        chunk_tokens: tokens per logits chunk; default: 2^22 / V.
        exit_targets: "labels" (the data, for every exit), "final" (exits before the last learn the last
            layer's argmax) or "final-soft" (its whole distribution); see the module docstring. Exits of
            weight 0 are scored against the data either way.
        unlikelihood: alpha >= 0, the weight of the last exit's unlikelihood term (module docstring); 0 = none.
    Returns:
        (J, {l: CE of exit l against its targets, detached}, UL: the last exit's unlikelihood term before its
        weights, detached; None when `unlikelihood` is 0).
    """
    if exit_targets not in EXIT_TARGETS:
        raise ValueError(f"exit_targets must be one of {', '.join(EXIT_TARGETS)}, got {exit_targets!r}")
    last = max(weights)
    order = [last] + sorted(l for l in weights if l != last)  # the last exit first: its logits are the teacher
    targets = labels[:, 1:].reshape(-1)  # (N,) with N = B * (T - 1)
    xs = [norm(hidden[l][:, :-1]).reshape(targets.shape[0], -1) for l in order]  # each (N, H)
    chunk = chunk_tokens or max(1, _CHUNK_ELEMENTS // head_weight.shape[0])
    need_grad = torch.is_grad_enabled() and (head_weight.requires_grad or any(x.requires_grad for x in xs))
    distill = exit_targets != "labels"
    distilled = tuple(distill and l != last and weights[l] != 0.0 for l in order)
    first_seen = first_positions(labels, head_weight.shape[0]) if unlikelihood else None
    loss, losses = SharedHeadCrossEntropy.apply(
        head_weight, targets, tuple(weights[l] for l in order), distilled, exit_targets == "final-soft", chunk,
        need_grad, float(unlikelihood), first_seen, *xs
    )
    return loss, {l: losses[order.index(l)] for l in sorted(weights)}, losses[len(order)] if unlikelihood else None


def first_positions(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V): the first position of each token id in each row of `labels` (B, T), T where it does not occur
    (ignored positions do not count). Position i's unlikelihood candidates are the ids whose first position is <= i."""
    B, T = labels.shape
    pos = torch.arange(T, device=labels.device).expand(B, T)
    pos = torch.where(labels != IGNORE_INDEX, pos, T)
    first = torch.full((B, vocab_size), T, dtype=pos.dtype, device=labels.device)
    return first.scatter_reduce_(1, labels.clamp(min=0), pos, reduce="amin")


_UL_EPS = 1e-5  # 1 - p is clamped here inside the log (a candidate the model is sure of gets no gradient)


class SharedHeadCrossEntropy(torch.autograd.Function):
    """sum_k w_k CE(x_k W^T, y_k) over exits k sharing the head W, in token chunks, gradients formed in forward.

    forward(W (V, H), y (N,), w (K floats), distilled (K bools), soft, chunk, need_grad, alpha, first_seen (B, V) or
    None, x_1..x_K (N, H) each) -> (J (), losses (K,), or (K + 1,) with alpha > 0: then the last is UL). y_k is the data y, except for a distilled exit k: the
    first exit's argmax (soft: its softmax, a distribution), computed from the same chunk's logits and held
    constant (no gradient). With alpha > 0, J adds alpha * w_1 * the first exit's unlikelihood (N = B * (T - 1):
    row r is position r % (T - 1) of sequence r // (T - 1)).
    """

    @staticmethod
    def forward(ctx, weight, targets, exit_w, distilled, soft, chunk, need_grad, alpha, first_seen, *xs):
        valid = targets != IGNORE_INDEX  # (N,)
        safe_targets = targets.clamp(min=0)  # (N,)
        count = valid.sum().clamp(min=1)  # ()  tokens that count, no host sync
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros_like(weight) if need_grad and ctx.needs_input_grad[0] else None  # (V, H)
        want_x = [need_grad and w != 0.0 and ctx.needs_input_grad[9 + k] for k, w in enumerate(exit_w)]
        grad_xs = [torch.empty_like(x) if want else None for x, want in zip(xs, want_x)]  # (N, H) each
        totals = [torch.zeros((), dtype=acc, device=weight.device) for _ in xs]
        teach = any(distilled)
        unlikely = torch.zeros((), dtype=acc, device=weight.device)
        per_row = targets.shape[0] // first_seen.shape[0] if alpha else 0  # T - 1
        for s in range(0, targets.shape[0], chunk):
            tc, vc = safe_targets[s : s + chunk], valid[s : s + chunk]
            rows = torch.arange(tc.shape[0], device=tc.device)
            teacher = None  # the first exit's argmax (c,) or softmax (c, V), for distilled exits
            for k, (x, w) in enumerate(zip(xs, exit_w)):
                xc = x[s : s + chunk]
                logits = (xc @ weight.t()).to(acc)  # (c, V)
                lse = torch.logsumexp(logits, dim=-1)  # (c,)
                if distilled[k] and soft:
                    picked = (teacher * logits).sum(-1)  # (c,)  CE against a distribution
                else:
                    y = teacher if distilled[k] else tc
                    picked = logits.gather(1, y[:, None]).squeeze(1)  # (c,)
                totals[k] = totals[k] + ((lse - picked) * vc).sum()
                if k == 0 and teach:
                    teacher = (logits - lse[:, None]).exp() if soft else logits.argmax(-1)
                p = ul_grad = None
                if k == 0 and alpha:
                    r = torch.arange(s, s + tc.shape[0], device=tc.device)
                    cand = first_seen[r // per_row] <= (r % per_row)[:, None]  # (c, V)  seen up to here
                    cand[rows, tc] = False  # ... except the true next token
                    p = (logits - lse[:, None]).exp()  # (c, V)
                    keep = 1.0 - p
                    unlikely = unlikely - (keep.clamp(min=_UL_EPS).log() * cand).sum(-1).mul(vc).sum()
                    if want_x[k] or grad_w is not None:
                        q = torch.where(cand & (keep > _UL_EPS), p / keep.clamp(min=_UL_EPS), 0.0)  # (c, V)
                        ul_grad = q - p * q.sum(-1, keepdim=True)  # d(-sum_c log(1 - p_c)) / dlogits
                if not (want_x[k] or (grad_w is not None and w != 0.0)):
                    continue
                probs = p if p is not None else logits.sub_(lse[:, None]).exp_()  # (c, V) softmax
                if distilled[k] and soft:
                    probs -= teacher
                else:
                    probs[rows, teacher if distilled[k] else tc] -= 1.0  # softmax - one-hot
                if ul_grad is not None:
                    probs.add_(ul_grad, alpha=alpha)
                probs.mul_((vc.to(acc) * w / count)[:, None])  # dJ/dlogits for this chunk
                g = probs.to(weight.dtype)
                if want_x[k]:
                    grad_xs[k][s : s + chunk] = g @ weight  # (c, H)
                if grad_w is not None:
                    grad_w.addmm_(g.t(), xc)  # (V, H)
        losses = torch.stack([t / count for t in totals])  # (K,)
        loss = (losses * torch.tensor(exit_w, dtype=losses.dtype, device=losses.device)).sum()
        if alpha:
            loss = loss + alpha * exit_w[0] * unlikely / count
            losses = torch.cat([losses, (unlikely / count)[None]])  # (K + 1,)
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
        return (grad_w, None, None, None, None, None, None, None, None, *grad_xs)
