"""Supervised fine-tuning loss and the token batch it reads.

Loss functions plugged into `DeepSpeedTrainer.train_step` share one shape: `loss_fn(model, micro)
-> (loss_sum, metrics)`, where `loss_sum` is a *sum* over the micro-batch's target tokens (the
trainer divides by the global number of target tokens, so the step is a token mean over the whole
global batch whatever the micro-batch split and world size) and `metrics` holds further token sums,
reported by the trainer as token means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TokenBatch:
    """Left- or right-padded token sequences with a mask of the positions that are trained on.

    Every tensor field has the batch dimension first, so a batch splits into micro-batches field
    by field; RL batches extend this with per-token fields (log-probs, advantages) of shape (B, T).
    """

    input_ids: torch.Tensor
    """(B, T) token ids."""
    attention_mask: torch.Tensor
    """(B, T) 1 on real tokens, 0 on padding."""
    loss_mask: torch.Tensor
    """(B, T) 1 where the token at t is a target, predicted from position t - 1 (prompt and
    padding are 0; position 0 is never a target)."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens only, as generation assigns them with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of a causal LM (a HF model or a DeepSpeed engine wrapping one)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
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
