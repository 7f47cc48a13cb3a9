"""Multi-turn episodes: the model and a `MultiTurnEnv` take turns until the episode is done.

All episodes of a rollout call advance together, one turn at a time: the model's turns of every
running episode are generated as one batch (each prompt is the conversation so far), then the env's
`step` calls run concurrently, each bounded and isolated. The sample is the whole conversation after
the prompt: model tokens with loss mask 1 and their behavior log-probs and versions, observation
tokens with loss mask 0 (never trained on; their log-prob slot holds 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tidal.envs.base import MultiTurnEnv, Step
from tidal.plugins import CallResult
from tidal.rollout.engines.base import Engine
from tidal.types import Completion, FinishReason, Prompt, Sample, SamplingParams

Caller = Callable[[list[Callable[[], Any]]], list[CallResult]]
"""Runs zero-argument calls concurrently, each bounded by a timeout and isolated (`BoundedCalls.run`)."""


@dataclass
class Episode:
    """One conversation in progress; becomes one `Sample` when done."""

    prompt_ids: list[int]
    state: Any = None
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logp_mu: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    step_rewards: list[float] = field(default_factory=list)
    infos: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    turns: int = 0
    turn_start: int = 0
    """Index in `response_ids` where the model's latest turn begins."""
    done: bool = False
    finish_reason: FinishReason = "stop"

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add_turn(self, c: Completion) -> None:
        self.turn_start = len(self.response_ids)
        self.response_ids += c.token_ids
        self.loss_mask += [1] * len(c.token_ids)
        self.logp_mu += c.logprobs
        self.versions += c.versions or [c.version] * len(c.token_ids)
        self.finish_reason = c.finish_reason
        self.turns += 1

    def add_observation(self, ids: list[int], version: int) -> None:
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logp_mu += [0.0] * len(ids)
        self.versions += [version] * len(ids)

    @property
    def info(self) -> dict[str, float]:
        """Mean of each `Step.info` key over the steps that reported it."""
        keys = dict.fromkeys(k for i in self.infos for k in i)
        return {k: sum(i[k] for i in self.infos if k in i) / sum(k in i for i in self.infos) for k in keys}


def episode_sample(e: Episode, prompt: Prompt, engine: Engine) -> Sample:
    """The sample of a finished episode (a multi-turn env's, or an agent's chain) of `prompt`."""
    return Sample(
        group_id=prompt.group_id,
        prompt_ids=e.prompt_ids,
        response_ids=e.response_ids,
        loss_mask=e.loss_mask,
        logp_mu=e.logp_mu,
        finish_reason=e.finish_reason,
        version=min(e.versions, default=engine.version),
        versions=e.versions,
        text=engine.tokenizer.decode(e.response_ids, skip_special_tokens=True),
        row=prompt.row,
        reward_errors=list(e.errors),
        env=prompt.env,
        turns=e.turns,
        step_rewards=e.step_rewards,
        env_info=e.info,
    )


def run_episodes(
    env: MultiTurnEnv,
    step: Callable[..., Any],
    episodes: list[Episode],
    engine: Engine,
    params: SamplingParams,
    call: Caller,
    max_context_tokens: int,
    batch_size: int,
    generate_kwargs: dict[str, Any] | None = None,
    between_generations: Callable[[], None] | None = None,
) -> None:
    """Advance every episode to its end. Each generate call (a chunk of `batch_size` running
    episodes, turn by turn) samples with `params`, seeded `params.seeded(i)` for call i;
    `between_generations` is called before each (the worker applies newer weights there). `step` is
    the env's (or its call into a process, see `EnvRuntime.method`), run through `call`. Each
    episode's turn gets at most what is left of its own `max_context_tokens`. Env failures end the
    episode and are recorded in `Episode.errors`."""
    calls = 0
    for turn in range(env.max_turns):
        running = [e for e in episodes if not e.done]
        for e in running:
            if len(e.context) >= max_context_tokens:
                e.done, e.finish_reason = True, "length"
        running = [e for e in running if not e.done]
        if not running:
            return
        for start in range(0, len(running), batch_size):
            chunk = running[start : start + batch_size]
            # Per episode: one long conversation must not cut its neighbours' turns short. Each has
            # room for at least one token, as the ones at the limit were ended above.
            budgets = [min(params.max_new_tokens, max_context_tokens - len(e.context)) for e in chunk]
            if between_generations is not None:
                between_generations()
            outs = engine.generate(
                [e.context for e in chunk], params.seeded(calls), max_tokens=budgets, **(generate_kwargs or {})
            )
            calls += 1
            for e, c in zip(chunk, outs, strict=True):
                e.add_turn(c)
        texts = [engine.tokenizer.decode(e.response_ids[e.turn_start :], skip_special_tokens=True) for e in running]
        results = call([partial(step, e.state, text) for e, text in zip(running, texts, strict=True)])
        for e, res in zip(running, results, strict=True):
            _apply_step(e, res, engine, last_turn=turn == env.max_turns - 1, max_context_tokens=max_context_tokens)


def _apply_step(e: Episode, res: CallResult, engine: Engine, last_turn: bool, max_context_tokens: int) -> None:
    if not res.ok:
        e.errors.append(f"step: {res.reason}")
        e.done = True
        return
    step = res.value
    if not isinstance(step, Step):
        e.errors.append(f"step: returned {type(step).__name__}, expected a tidal.envs.Step")
        e.done = True
        return
    e.step_rewards.append(float(step.reward))
    if step.info:
        e.infos.append({str(k): float(v) for k, v in step.info.items()})
    if step.done or last_turn:
        e.done = True
        return
    if step.observation:
        ids = engine.tokenizer(step.observation, add_special_tokens=False)["input_ids"]
        room = max_context_tokens - len(e.context)
        if len(ids) >= room:  # no room left for the model to answer the observation
            e.add_observation(ids[: max(room, 0)], engine.version)
            e.done, e.finish_reason = True, "length"
            return
        e.add_observation(ids, engine.version)
