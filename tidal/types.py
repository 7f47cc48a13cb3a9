"""Typed records that cross stage (and later Ray) boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """How one batch is generated. temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    """One generated completion of one prompt.

    `logprobs[i]` is the behavior log-prob of `token_ids[i]` under the distribution sampled from
    (log_softmax(logits / temperature) of the raw logits; temperature 1 for greedy decoding).
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float]
    version: int = 0


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
