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
    """A batch of token sequences for the trainer, right-padded, all (B, T).

    `loss_mask[b, t]` is 1 where token t is a training target (predicted from position t - 1);
    prompt and padding positions are 0.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> TokenBatch:
        return TokenBatch(self.input_ids[start:stop], self.attention_mask[start:stop], self.loss_mask[start:stop])
