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
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from tidal.config import RewardsConfig
from tidal.rewards.base import RewardResult, describe_exception
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


@dataclass
class _Outcome:
    score: float
    sub_scores: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    """One of FAILURE_KINDS, None on success."""
    reason: str = ""


class RewardScorer:
    """Resolves `rewards.functions` once, then scores batches: `score(samples) -> metrics`.

    Async rewards run on one long-lived event loop (in a daemon thread, so clients they keep stay
    bound to one loop across batches) and are cancelled at the timeout. Sync rewards run in daemon
    threads, at most `max_threads` at once; a timed-out thread cannot be killed, so it is abandoned:
    it gives its slot back and, being a daemon, never holds up process exit.
    """

    def __init__(self, cfg: RewardsConfig, max_threads: int = 16) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.cfg = cfg
        resolved = resolve_rewards(cfg)
        self._rewards = [
            _Reward(name, fn, kwargs, spec.weight, _is_async(fn))
            for (name, fn, kwargs), spec in zip(resolved, cfg.functions, strict=True)
        ]
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="tidal-rewards", daemon=True)
        self._loop_thread.start()
        # The timeout starts when a call gets a slot, so a long queue is not mistaken for a slow reward.
        self._slots = asyncio.Semaphore(max_threads)

    @property
    def names(self) -> list[str]:
        """Log names of the reward functions, in config order."""
        return [r.name for r in self._rewards]

    def score(self, samples: list[Sample]) -> dict[str, float]:
        """Fill each sample's `reward`, `scores` and `reward_errors`; return `reward/...` metrics of the batch."""
        start = time.perf_counter()
        outcomes = asyncio.run_coroutine_threadsafe(self._score_all(samples), self._loop).result()
        failed: Counter[str] = Counter()
        for sample, outs in zip(samples, outcomes, strict=True):
            sample.reward = sum(r.weight * o.score for r, o in zip(self._rewards, outs, strict=True))
            sample.scores, sample.reward_errors = {}, []
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
        return _metrics(samples, failed, time.perf_counter() - start)

    def close(self) -> None:
        """Stop the event loop; sync calls still running are abandoned (daemon threads)."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=5.0)
        if not self._loop_thread.is_alive():  # An async reward blocking the loop would keep it running.
            self._loop.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- on the loop

    async def _score_all(self, samples: list[Sample]) -> list[list[_Outcome]]:
        n = len(self._rewards)
        flat = await asyncio.gather(*(self._call(r, s) for s in samples for r in self._rewards))
        return [flat[i * n : (i + 1) * n] for i in range(len(samples))]

    async def _call(self, r: _Reward, sample: Sample) -> _Outcome:
        timeout = self.cfg.timeout_s
        try:
            if r.is_async:
                ok, value = await asyncio.wait_for(_run_async(r, sample), timeout)
            else:
                async with self._slots:
                    ok, value = await asyncio.wait_for(self._run_in_thread(r, sample), timeout)
        except TimeoutError:  # Only ours: the user's own exceptions come back as (False, exc).
            return self._failed("timeout", f"timed out after {timeout}s")
        if not ok:
            return self._failed("exception", f"raised {describe_exception(value)}")
        return self._check(value)

    def _run_in_thread(self, r: _Reward, sample: Sample) -> asyncio.Future[tuple[bool, Any]]:
        loop = self._loop
        fut: asyncio.Future[tuple[bool, Any]] = loop.create_future()

        def run() -> None:
            try:
                out: tuple[bool, Any] = (True, r.fn(sample, sample.row, **r.kwargs))
            except BaseException as e:  # The isolation boundary: even sys.exit() in a reward is recorded.
                out = (False, e)
            try:
                loop.call_soon_threadsafe(_set_result, fut, out)
            except RuntimeError:  # The scorer was closed; nobody waits for this abandoned call.
                pass

        threading.Thread(target=run, name=f"reward-{r.name}", daemon=True).start()
        return fut

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


def _is_async(fn: Callable[..., Any]) -> bool:
    # A class instance with `async def __call__` is not a coroutine function itself.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


async def _run_async(r: _Reward, sample: Sample) -> tuple[bool, Any]:
    try:
        return True, await r.fn(sample, sample.row, **r.kwargs)
    except Exception as e:  # CancelledError is a BaseException and passes, so wait_for can cancel.
        return False, e


def _set_result(fut: asyncio.Future[tuple[bool, Any]], out: tuple[bool, Any]) -> None:
    if not fut.done():  # Cancelled by wait_for when the call timed out.
        fut.set_result(out)


def _metrics(samples: list[Sample], failed: Counter[str], elapsed: float) -> dict[str, float]:
    rewards = [s.reward for s in samples]
    metrics = {
        "reward/mean": statistics.fmean(rewards) if rewards else 0.0,
        "reward/std": statistics.pstdev(rewards) if rewards else 0.0,
    }
    keys = dict.fromkeys(k for s in samples for k in s.scores)  # names and name/sub, in order, once
    for k in keys:
        metrics[f"reward/{k}"] = statistics.fmean(s.scores[k] for s in samples if k in s.scores)
    metrics["reward/failed"] = float(sum(failed.values()))
    metrics.update({f"reward/failed_{kind}": float(failed[kind]) for kind in FAILURE_KINDS})
    metrics["reward/score_time_s"] = elapsed
    return metrics
