"""Supervised fine-tuning loss over a `tidal.types.TokenBatch`.

Loss functions plugged into `DeepSpeedTrainer.train_step` share one shape: `loss_fn(model, micro)
-> (loss_sum, metrics)`, where `loss_sum` is a *sum* over the micro-batch's target tokens (the
trainer divides by the global number of target tokens, so the step is a token mean over the whole
global batch whatever the micro-batch split and world size) and `metrics` holds further token sums,
reported by the trainer as token means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidal.rollout.engine import positions
from tidal.types import TokenBatch


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of a causal LM (a HF model or a DeepSpeed engine wrapping one)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        use_cache=False,
    )
    return out.logits


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the target tokens: -sum_t m_t log p(x_t | x_<t).

    logits: (B, T, V) at every position; input_ids, loss_mask: (B, T). Position t - 1 predicts
    token t, so the last logit and the first mask entry are unused. Computed in fp32.
    """
    pred = logits[:, :-1].float()  # (B, T-1, V)
    target = input_ids[:, 1:]  # (B, T-1)
    mask = loss_mask[:, 1:].to(pred.dtype)  # (B, T-1)
    nll = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # (B, T-1)
    return (nll * mask).sum()


def num_targets(loss_mask: torch.Tensor) -> torch.Tensor:
    """Number of target tokens of a (B, T) loss mask (position 0 cannot be one)."""
    return loss_mask[:, 1:].sum()


def sft_loss(model: torch.nn.Module, micro: TokenBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy summed over the micro-batch's target tokens (the default loss_fn)."""
    logits = forward_logits(model, micro.input_ids, micro.attention_mask)
    return next_token_nll(logits, micro.input_ids, micro.loss_mask), {}
