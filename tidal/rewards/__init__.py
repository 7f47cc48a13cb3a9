"""Reward functions: the protocol, built-ins, plugin loading and the batch scorer.

A reward is `fn(sample, row, **kwargs) -> float | bool | int | RewardResult` (or `async def`), named in
the config by a built-in name or by `pkg.mod:fn` / `./file.py:fn`.
"""

from tidal.rewards.base import RewardFn, RewardResult, RewardValue
from tidal.rewards.builtins import BUILTINS
from tidal.rewards.loading import resolve_reward, resolve_rewards
from tidal.rewards.scoring import FAILURE_KINDS, RewardScorer

__all__ = [
    "BUILTINS",
    "FAILURE_KINDS",
    "RewardFn",
    "RewardResult",
    "RewardScorer",
    "RewardValue",
    "resolve_reward",
    "resolve_rewards",
]
