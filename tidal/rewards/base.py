"""What a reward function is: a callable of (sample, row, **kwargs) that returns a score or a `RewardResult`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from tidal.types import Sample


@dataclass
class RewardResult:
    """A score plus named sub-scores; sub-scores are logged as `<name>/<sub>` but not summed into the reward."""

    score: float
    sub_scores: dict[str, float] = field(default_factory=dict)


RewardValue: TypeAlias = float | bool | int | RewardResult
"""What one reward call may return; a bool counts as 1.0 / 0.0."""


class RewardFn(Protocol):
    """A reward: sees one sample, its dataset row and its own kwargs from the config, never the run config.

    May be a plain function or an `async def`; either way the scorer bounds each call by
    `rewards.timeout_s` and records a failure (raise, timeout, NaN, wrong type) on the sample.
    """

    def __call__(
        self, sample: Sample, row: dict[str, Any], /, **kwargs: Any
    ) -> RewardValue | Awaitable[RewardValue]: ...


def is_trl_style(fn: Callable[..., Any]) -> bool:
    """A reward written for TRL's GRPOTrainer: `fn(prompts, completions, **columns) -> list[float]`,
    called once per batch with the dataset's columns as lists."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return params[:2] == ["prompts", "completions"]
