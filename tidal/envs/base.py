"""What an environment is: a dataset row becomes a prompt; the model's turns are answered and scored.

Two kinds, both small classes a user subclasses in their own file and names in YAML
(`envs: [{path: ./my_env.py:MyEnv, kwargs: {...}}]`):

- `Env` (single turn): `prompt(row)` turns a row into the prompt text, `score(sample, row)` scores
  one completion (a float or a `RewardResult` with sub-scores; sync or `async def`).
- `MultiTurnEnv`: an episode. `reset(row)` makes the episode's state, then `step(state, text)` answers
  each model turn with a `Step`: an observation (e.g. a tool's result) appended to the conversation,
  a reward and whether the episode is done. Observation tokens sit in the sample with loss mask 0;
  the model's own tokens keep their behavior log-probs, so the sample trains correctly. The episode
  ends at `done`, at `max_turns`, or when the conversation reaches `rollout.max_context_tokens`.

Every call into an env (prompt, reset, step, score) is bounded by `rewards.timeout_s` and isolated:
a call that raises, hangs or returns the wrong thing is recorded on the sample and counted, and the
run goes on. Envs get narrow arguments (the row, the sample, their own kwargs), never the run config.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tidal.rewards.base import RewardValue
from tidal.types import Sample


@dataclass
class Step:
    """A multi-turn env's answer to one model turn."""

    observation: str | None = None
    """Text appended to the conversation before the model's next turn (loss mask 0); None for none."""
    reward: float = 0.0
    """Reward of this step; a sample's reward is the sum over its steps (unless `score` says otherwise)."""
    done: bool = False
    """The episode is over (the model gets no further turn)."""
    info: dict[str, float] = field(default_factory=dict)
    """Numbers to log as the env's sub-scores (averaged over the episode's steps)."""


class Env:
    """A single-turn environment. Subclass it and override `score` (and `prompt` if the row's
    `prompt` column is not the prompt text as is). Built once per worker with the YAML kwargs."""

    multi_turn: ClassVar[bool] = False
    agent: ClassVar[bool] = False
    """The model is called by the user's agent through the endpoint (`tidal.envs.agent.AgentEnv`)."""
    stop: ClassVar[list[str]] = []
    """Stop strings of a model turn, added to `rollout.stop`."""

    def prompt(self, row: dict[str, Any]) -> str:
        """The text the model sees for `row` (before the chat template, when `data.chat_template`)."""
        return str(row["prompt"])

    def score(self, sample: Sample, row: dict[str, Any]) -> RewardValue | Awaitable[RewardValue]:
        """Reward of one completion (`sample.text`); may be `async def`."""
        raise NotImplementedError(f"{type(self).__name__} must define score(sample, row)")

    def is_correct(self, sample: Sample, row: dict[str, Any]) -> bool:
        """Counts the sample as correct in the accuracy metrics; by default a positive reward."""
        return sample.reward > 0


class MultiTurnEnv(Env):
    """A multi-turn environment. Subclass it and override `step` (and `reset`, `prompt`, `score`)."""

    multi_turn: ClassVar[bool] = True
    max_turns: int = 4
    """Model turns per episode at most (an instance attribute, so kwargs may set it)."""

    def reset(self, row: dict[str, Any]) -> Any:
        """The state of a new episode for `row` (any object; passed back to every `step`)."""
        return None

    def step(self, state: Any, text: str) -> Step | Awaitable[Step]:
        """Answer the model's turn `text`; may be `async def`."""
        raise NotImplementedError(f"{type(self).__name__} must define step(state, text)")

    def score(self, sample: Sample, row: dict[str, Any]) -> RewardValue | Awaitable[RewardValue]:
        """Reward of a finished episode; by default the sum of its steps' rewards."""
        return float(sum(sample.step_rewards))
