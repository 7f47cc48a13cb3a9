"""Score a batch of samples with the configured rewards: all calls at once, each bounded and isolated.

A call that raises, runs past `rewards.timeout_s`, returns NaN / inf or a wrong type is recorded on
its sample (`reward_errors`), scores `rewards.failure_reward`, and the run goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from numbers import Real
from typing import Any

from tidal.config import RewardsConfig
from tidal.metrics import Metrics, largest, mean, spread, total
from tidal.plugins import BoundedCalls, describe_exception, is_async
from tidal.rewards.base import RewardResult, is_trl_style
from tidal.rewards.loading import resolve_rewards
from tidal.types import Sample

logger = logging.getLogger(__name__)

FAILURE_KINDS = ("timeout", "exception", "nan", "type")
"""Why a call failed; each is counted under `reward/failed_<kind>`."""


@dataclass
class _Reward:
    name: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    weight: float
    is_async: bool
    batched: bool = False
    """TRL's form: called once per batch as fn(prompts, completions, **columns) -> list of scores."""


@dataclass
class _Outcome:
    score: float
    sub_scores: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    """One of FAILURE_KINDS, None on success."""
    reason: str = ""


class RewardScorer:
    """Resolves `rewards.functions` once, then scores batches: `score(samples) -> metrics`.

    Every call runs through `BoundedCalls` (`tidal.plugins`): async rewards on one long-lived event
    loop, cancelled at the timeout; sync ones in daemon threads, at most `max_threads` at once.
    """

    def __init__(
        self, cfg: RewardsConfig, max_threads: int = 16,
        rewards: list[tuple[str, Callable[..., Any], dict[str, Any], float]] | None = None,
    ) -> None:  # fmt: skip
        """`rewards` (name, callable, kwargs, weight) replaces `cfg.functions` (e.g. an env's score and
        its extra rewards); `cfg` still gives the timeout and the failure reward."""
        self.cfg = cfg
        self.calls = BoundedCalls(cfg.timeout_s, max_threads)
        if rewards is None:
            resolved = resolve_rewards(cfg)
            rewards = [(n, fn, kw, spec.weight) for (n, fn, kw), spec in zip(resolved, cfg.functions, strict=True)]
        self._rewards = [_Reward(n, fn, kw, w, is_async(fn), is_trl_style(fn)) for n, fn, kw, w in rewards]

    @property
    def names(self) -> list[str]:
        """Log names of the reward functions, in config order."""
        return [r.name for r in self._rewards]

    def score(self, samples: list[Sample]) -> Metrics:
        """Fill each sample's `reward`, `scores` and `reward_errors`; return `reward/...` metrics of the batch."""
        start = time.perf_counter()
        outcomes = self.calls.submit(self._score_all(samples))
        failed: Counter[str] = Counter()
        for sample, outs in zip(samples, outcomes, strict=True):
            sample.reward = sum(r.weight * o.score for r, o in zip(self._rewards, outs, strict=True))
            sample.scores = {}  # reward_errors may already hold an env's failed steps: kept
            for r, o in zip(self._rewards, outs, strict=True):
                sample.scores[r.name] = o.score
                sample.scores.update({f"{r.name}/{k}": v for k, v in o.sub_scores.items()})
                if o.failure is not None:
                    failed[o.failure] += 1
                    sample.reward_errors.append(f"{r.name}: {o.reason}")
        if failed:
            first = next(e for s in samples for e in s.reward_errors)
            n_calls = len(samples) * len(self._rewards)
            logger.warning("%d of %d reward calls failed; first: %s", sum(failed.values()), n_calls, first)
        return reward_metrics(samples, failed, time.perf_counter() - start)

    def close(self) -> None:
        """Close rewards that hold resources (an `aclose()` coroutine, e.g. a remote judge's HTTP
        client), then stop the calls' event loop."""
        if self.calls.closed:
            return
        for r in self._rewards:
            aclose = getattr(r.fn, "aclose", None)
            if aclose is not None and inspect.iscoroutinefunction(aclose):
                try:
                    asyncio.run_coroutine_threadsafe(aclose(), self.calls.loop).result(timeout=5.0)
                except Exception as e:  # closing is best effort; a reward's own error must not mask others
                    logger.warning("closing reward %s raised %s", r.name, describe_exception(e))
        self.calls.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- on the loop

    async def _score_all(self, samples: list[Sample]) -> list[list[_Outcome]]:
        """Outcomes per sample, per reward in config order, every reward at once: per-sample rewards
        called once per sample (sync ones a few threads for the batch, async ones on the loop),
        TRL-style ones once for the whole batch."""
        columns = await asyncio.gather(*(self._column(r, samples) for r in self._rewards))
        return [[column[i] for column in columns] for i in range(len(samples))]

    async def _column(self, r: _Reward, samples: list[Sample]) -> list[_Outcome]:
        if r.batched:
            return await self._call_batched(r, samples)
        if r.is_async:
            return list(await asyncio.gather(*(self._call(r, s) for s in samples)))
        calls = [partial(r.fn, s, s.row, **r.kwargs) for s in samples]
        return [self._outcome(result) for result in await self.calls.bounded_each(calls, r.name)]

    async def _call_batched(self, r: _Reward, samples: list[Sample]) -> list[_Outcome]:
        """A TRL-style reward over the whole batch: one call, one score per sample (None scores 0)."""
        rows = [s.row for s in samples]
        columns = {k: [row[k] for row in rows] for k in rows[0] if all(k in row for row in rows)} if rows else {}
        columns.pop("prompt", None)
        kwargs = {**columns, "completion_ids": [s.response_ids for s in samples], **r.kwargs}
        prompts, completions = [row.get("prompt", "") for row in rows], [s.text for s in samples]
        try:
            ok, value = await self.calls.bounded(lambda: r.fn(prompts, completions, **kwargs), r.name, r.is_async)
        except TimeoutError:
            return [self._failed("timeout", f"timed out after {self.cfg.timeout_s}s")] * len(samples)
        if not ok:
            return [self._failed("exception", f"raised {describe_exception(value)}")] * len(samples)
        if not isinstance(value, list | tuple) or len(value) != len(samples):
            got = f"{len(value)} scores" if isinstance(value, list | tuple) else type(value).__name__
            return [self._failed("type", f"returned {got}, expected a list of {len(samples)} scores")] * len(samples)
        return [_Outcome(0.0) if v is None else self._check(v) for v in value]

    async def _call(self, r: _Reward, sample: Sample) -> _Outcome:
        try:
            result = await self.calls.bounded(lambda: r.fn(sample, sample.row, **r.kwargs), r.name, r.is_async)
        except TimeoutError:  # Only ours: the user's own exceptions come back as (False, exc).
            result = None
        return self._outcome(result)

    def _outcome(self, result: tuple[bool, Any] | None) -> _Outcome:
        """A call's (ok, value or exception), None when it timed out, as an outcome."""
        if result is None:
            return self._failed("timeout", f"timed out after {self.cfg.timeout_s}s")
        ok, value = result
        if not ok:
            return self._failed("exception", f"raised {describe_exception(value)}")
        return self._check(value)

    def _check(self, value: Any) -> _Outcome:
        score, subs = (value.score, value.sub_scores) if isinstance(value, RewardResult) else (value, {})
        if not isinstance(subs, dict):
            return self._failed("type", f"returned sub_scores of type {type(subs).__name__}, expected a dict")
        for where, v in [("", score), *((f" in sub-score {k!r}", s) for k, s in subs.items())]:
            # bool is an int and numpy scalars register as Real, so both pass.
            if not isinstance(v, Real):
                expected = "a number" if where else "a number or RewardResult"
                return self._failed("type", f"returned {type(v).__name__}{where}, expected {expected}")
            if not math.isfinite(v):
                return self._failed("nan", f"returned {'NaN' if math.isnan(v) else float(v)}{where}")
        return _Outcome(float(score), {str(k): float(s) for k, s in subs.items()})

    def _failed(self, kind: str, reason: str) -> _Outcome:
        return _Outcome(self.cfg.failure_reward, failure=kind, reason=reason)


def reward_metrics(samples: list[Sample], failed: Counter[str], elapsed: float) -> Metrics:
    """`reward/` metrics of a scored batch: mean, std, each function's mean, failures by kind."""
    rewards = [s.reward for s in samples]
    n = float(len(rewards))
    center = statistics.fmean(rewards) if rewards else 0.0
    metrics = {
        "reward/mean": mean(center, n),
        "reward/std": spread(statistics.pstdev(rewards) if rewards else 0.0, center, n),
    }
    keys = dict.fromkeys(k for s in samples for k in s.scores)  # names and name/sub, in order, once
    for k in keys:
        scored = [s.scores[k] for s in samples if k in s.scores]
        metrics[f"reward/{k}"] = mean(statistics.fmean(scored), float(len(scored)))
    metrics["reward/failed"] = total(float(sum(failed.values())))
    metrics.update({f"reward/failed_{kind}": total(float(failed[kind])) for kind in FAILURE_KINDS})
    metrics["reward/score_time_s"] = largest(elapsed)  # scorers of several workers run side by side
    return metrics
