"""The training forward: a transformers causal LM's own modules, with layer dropout and the early-exit loss.

`LayerSkipModel` wraps a Llama-family `*ForCausalLM` without copying or renaming anything: it registers the
causal LM's own `model` (embeddings, decoder layers, final norm, rotary embedding) and `lm_head` as its
children, so its parameter names are the causal LM's (`model.layers.0.self_attn.q_proj.weight`, ...), its
state dict is a transformers checkpoint, and DDP/FSDP wrap it like the causal LM itself. The config is never
touched: early exits are read off the hidden states between layers.

Forward at train time (t = the optimizer step, given by the trainer):
  h = embed(x); for l in 0..L-1: h = layer_l(h) on the rows kept by layer dropout; keep h_l if exit l is active
  J = sum over active exits of w(t, l) * CE(head(norm(h_l)), next token, or the last layer's argmax with
      exit_targets="final")
At eval time: no dropout; the loss is the last layer's CE, and every exit's CE is reported.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from layerskip.training.curriculum import Curriculum
from layerskip.training.early_exit_loss import check_scales, early_exit_loss, exit_weights
from layerskip.training.layer_dropout import LayerDropout, run_on_rows


@dataclass
class StepOutput:
    """What one forward returns. `exit_losses` are detached, one per exit in `exit_weights`."""

    loss: torch.Tensor  # ()
    exit_losses: dict[int, torch.Tensor]
    exit_weights: dict[int, float]
    kept_rows: torch.Tensor | None = None  # (L, B) bool, None when no layer dropout ran
    unlikelihood: torch.Tensor | None = None  # () the last exit's unlikelihood term (unweighted), detached; None: off

    # transformers' Trainer indexes outputs like a dict or a tuple
    def __getitem__(self, key):
        return self.loss if key in (0, "loss") else getattr(self, key)

    def keys(self):
        return ["loss", "exit_losses", "exit_weights"]


class LayerSkipModel(nn.Module):
    """A causal LM trained with layer dropout and the early-exit loss.

    Args:
        causal_lm: a `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM`.
        layer_dropout: the rates p(l, t) and their masks.
        curriculum: C(t, l).
        early_exit_scale: e_scale in [0, 1].
        early_exit_weights: explicit e(l) for every layer in place of the paper's formula (None: the formula).
        rank: this process's data-parallel rank (seeds its masks; each rank drops its own samples).
        exit_targets: what exits before the last learn while training: "labels" (the data), "final" (the
            last layer's greedy prediction) or "final-soft" (its distribution); see early_exit_loss. Evaluation always scores against the data.
        unlikelihood: alpha of the last exit's token-level unlikelihood term while training (0 = none; see
            early_exit_loss). Evaluation leaves it out.
    """

    def __init__(
        self,
        causal_lm: nn.Module,
        layer_dropout: LayerDropout,
        curriculum: Curriculum,
        early_exit_scale: float,
        rank: int = 0,
        chunk_tokens: int | None = None,
        exit_targets: str = "labels",
        early_exit_weights: list[float] | None = None,
        unlikelihood: float = 0.0,
    ):
        super().__init__()
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.__dict__["causal_lm"] = causal_lm  # not a child: its parameters are ours already
        self.lm_config = causal_lm.config  # deliberately not `config`: the Trainer writes `model.config.use_cache`
        self._no_split_modules = getattr(causal_lm, "_no_split_modules", None)  # FSDP auto-wrap
        self.main_input_name = "input_ids"
        self.layer_dropout = layer_dropout
        self.curriculum = curriculum
        self.early_exit_scale = early_exit_scale
        self.rank = rank
        self.chunk_tokens = chunk_tokens
        self.exit_targets = exit_targets
        self.unlikelihood = unlikelihood
        self.num_layers = len(self.model.layers)
        self.early_exit_weights = None if early_exit_weights is None else check_scales(early_exit_weights, self.num_layers)
        if getattr(self.lm_head, "bias", None) is not None:
            raise ValueError("LM heads with a bias are not supported")

    def schedule(self, step: int) -> tuple[list[float], dict[int, float]]:
        """(p(l, t) for every layer, w(t, l) for the active exits) at step t."""
        rates = self.layer_dropout.rates(step)
        weights = exit_weights(self.num_layers, self.curriculum.active(step), self.early_exit_scale,
                               self.early_exit_weights)
        return rates, weights

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        step: int = 0,
        micro_step: int = 0,
    ) -> StepOutput:
        """input_ids, labels: (B, T). labels default to input_ids (plain language modelling)."""
        labels = input_ids if labels is None else labels
        if self.training:
            rates, weights = self.schedule(step)
            keep = None
            if self.layer_dropout.enabled:
                keep = self.layer_dropout.sample_keep(step, input_ids.shape[0], micro_step, self.rank)  # (L, B)
        else:  # evaluation: every exit, the loss is the last layer's
            keep, weights = None, {l: 0.0 for l in range(self.num_layers)}
            weights[self.num_layers - 1] = 1.0
        hidden = self.hidden_states(input_ids, keep, exits=set(weights))
        loss, losses, unlikely = early_exit_loss(
            hidden, labels, self.model.norm, self.lm_head.weight, weights, self.chunk_tokens,
            self.exit_targets if self.training else "labels", self.unlikelihood if self.training else 0.0,
        )
        return StepOutput(loss, losses, weights, keep, unlikely)

    def hidden_states(
        self, input_ids: torch.Tensor, keep: torch.Tensor | None = None, exits: set[int] | None = None
    ) -> dict[int, torch.Tensor]:
        """{l: (B, T, H) output of layer l} for l in `exits` (default: all), running layers on kept rows only.

        Args:
            input_ids: (B, T).
            keep: (L, B) bool, True = layer l runs on row b; None = every layer runs on every row.
        """
        base = self.model
        h = base.embed_tokens(input_ids)  # (B, T, H)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
        position_embeddings = base.rotary_emb(h, position_ids)  # cos, sin: (1, T, D)
        masks = causal_masks(self.lm_config, h, position_ids)
        wanted = set(range(self.num_layers)) if exits is None else exits
        out = {}
        for l, layer in enumerate(base.layers):
            kwargs = dict(
                attention_mask=masks[l], position_ids=position_ids, position_embeddings=position_embeddings
            )
            h = layer(h, **kwargs) if keep is None else run_on_rows(layer, h, keep[l], **kwargs)  # (B, T, H)
            if l in wanted:
                out[l] = h
        return out


@functools.cache
def mask_cache_argument() -> str:
    """The name of transformers' `create_causal_mask` cache argument: `cache` in newer releases, `past_key_values`
    (deprecated there) before."""
    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def causal_masks(config, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> list:
    """The attention mask each layer gets in the model's own forward (None = plain causal), for unpadded input.

    Layers follow `config.layer_types` ("full_attention" / "sliding_attention") where the config has them
    (Qwen2, Qwen3), else a sliding window on every layer when `config.sliding_window` is set (Mistral).
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kwargs = {"config": config, "inputs_embeds": inputs_embeds, "attention_mask": None, mask_cache_argument(): None,
              "position_ids": position_ids}
    num_layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        types = [kind] * num_layers
    made = {}
    for kind in set(types):
        fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        made[kind] = fn(**kwargs)
    return [made[kind] for kind in types[:num_layers]]
