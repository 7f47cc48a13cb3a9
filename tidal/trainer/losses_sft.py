"""Supervised fine-tuning loss over a `tidal.types.TokenBatch`.

Loss functions plugged into `DeepSpeedTrainer.train_step` share one shape: `loss_fn(model, micro,
packed) -> (loss_sum, metrics)`, where `loss_sum` is a *sum* over the micro-batch's target tokens (the
trainer divides by the global number of target tokens, so the step is a token mean over the whole
global batch whatever the micro-batch split and world size) and `metrics` are `tidal.telemetry.metrics`
values that declare how they merge over micro-batches and ranks.
"""

from __future__ import annotations

import torch

from tidal.model.forward import forward_hidden, head_token_stats, token_logprobs
from tidal.telemetry.metrics import Metrics
from tidal.types import TokenBatch


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the target tokens: -sum_t m_t log p(x_t | x_<t).

    logits: (B, T, V) at every position; input_ids, loss_mask: (B, T). Position t - 1 predicts
    token t, so the last logit and the first mask entry are unused. Computed in fp32, chunk by chunk.
    """
    return -(token_logprobs(logits, input_ids) * loss_mask.float()).sum()


def num_targets(loss_mask: torch.Tensor) -> torch.Tensor:
    """Number of target tokens of a (B, T) loss mask (position 0 cannot be one)."""
    return loss_mask[:, 1:].sum()


def sft_loss(model: torch.nn.Module, micro: TokenBatch, packed: bool = False) -> tuple[torch.Tensor, Metrics]:
    """Next-token cross-entropy summed over the micro-batch's target tokens (the default loss_fn)."""
    hidden = forward_hidden(model, micro.input_ids, micro.attention_mask, packed=packed)
    logp, _ = head_token_stats(hidden, micro.input_ids)
    return -(logp * micro.loss_mask.float()).sum(), {}
