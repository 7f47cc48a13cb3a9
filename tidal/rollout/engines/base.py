"""What rollout needs of a generation engine (`Engine`): the transformers engine (`transformers`) and
vLLM (`vllm`) both provide it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from tidal.types import Completion, SamplingParams
from tidal.weight_sync import Weights

Admit = Callable[[int], list[tuple[list[int], int]]]
"""Continuous batching's hook: given the rows running, new (prompt token ids, max new tokens) rows."""


def row_limits(n: int, params: SamplingParams, max_tokens: list[int] | None) -> list[int]:
    """Each of `n` rows' cap on new tokens: `max_tokens` when given (one per row, replacing
    `params.max_new_tokens`), else `params.max_new_tokens` for every row."""
    if max_tokens is None:
        return [params.max_new_tokens] * n
    if len(max_tokens) != n or min(max_tokens) < 1:
        raise ValueError(f"max_tokens must hold one limit >= 1 per prompt: got {max_tokens} for {n} prompts")
    return list(max_tokens)


class Engine(Protocol):
    """What rollout needs of a generation engine (`transformers`, `vllm`)."""

    tokenizer: PreTrainedTokenizerBase
    version: int
    """Policy version of the weights held."""

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_chunk: Callable[[], None] | None = None,
        chunk_tokens: int = 8,
        max_tokens: list[int] | None = None,
        on_finish: Callable[[int, Completion], None] | None = None,
        admit: Admit | None = None,
    ) -> list[Completion]:
        """One completion per prompt. `max_tokens[i]` caps row i's new tokens (finish reason "length"
        at the cap); None: `params.max_new_tokens` for every row. `on_finish(i, completion)` is called
        for each prompt as soon as its completion ends (streaming rollout puts a group into the
        buffer the moment its last sample ends). `admit(running)` is called every `chunk_tokens`
        steps and returns new rows to generate in the same call (continuous batching); their
        completions follow the prompts' in the list returned."""
        ...

    def weight_names(self) -> set[str]:
        """HF names of the weights a snapshot must carry."""
        ...

    def load_weights(self, weights: Weights, version: int) -> None:
        """Load a full snapshot of HF names between generations and hold `version`: one state dict,
        or a stream of partial ones (buckets) loaded one at a time."""
        ...
