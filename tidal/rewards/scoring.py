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
from tidal.rewards.base import RewardResult, describe_exception, is_trl_style
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
class CallResult:
    """Outcome of one bounded, isolated call (`RewardScorer.run_calls`)."""

    ok: bool
    value: Any = None
    """The call's return value (when ok)."""
    reason: str = ""
    """One line on why it failed: raised (with the exception), or timed out."""


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

    def __init__(
        self, cfg: RewardsConfig, max_threads: int = 16,
        rewards: list[tuple[str, Callable[..., Any], dict[str, Any], float]] | None = None,
    ) -> None:  # fmt: skip
        """`rewards` (name, callable, kwargs, weight) replaces `cfg.functions` (e.g. an env's score and
        its extra rewards); `cfg` still gives the timeout and the failure reward."""
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.cfg = cfg
        if rewards is None:
            resolved = resolve_rewards(cfg)
            rewards = [(n, fn, kw, spec.weight) for (n, fn, kw), spec in zip(resolved, cfg.functions, strict=True)]
        self._rewards = [_Reward(n, fn, kw, w, _is_async(fn), is_trl_style(fn)) for n, fn, kw, w in rewards]
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

    def run_calls(self, calls: list[Callable[[], Any]]) -> list[CallResult]:
        """Run zero-argument calls (sync or returning an awaitable) concurrently, each bounded by
        `rewards.timeout_s` and isolated like a reward call: an env's steps use this."""
        return asyncio.run_coroutine_threadsafe(self._run_all(calls), self._loop).result()

    async def _run_all(self, calls: list[Callable[[], Any]]) -> list[CallResult]:
        return list(await asyncio.gather(*(self._run_one(c) for c in calls)))

    async def _run_one(self, call: Callable[[], Any]) -> CallResult:
        try:
            ok, value = await self._bounded(call, getattr(call, "__name__", "call"), _is_async(call))
        except TimeoutError:
            return CallResult(False, reason=f"timed out after {self.cfg.timeout_s}s")
        return CallResult(True, value) if ok else CallResult(False, reason=f"raised {describe_exception(value)}")

    def close(self) -> None:
        """Close rewards that hold resources (an `aclose()` coroutine, e.g. a remote judge's HTTP
        client), then stop the event loop; sync calls still running are abandoned (daemon threads)."""
        if self._loop.is_closed():
            return
        for r in self._rewards:
            aclose = getattr(r.fn, "aclose", None)
            if aclose is not None and inspect.iscoroutinefunction(aclose):
                try:
                    asyncio.run_coroutine_threadsafe(aclose(), self._loop).result(timeout=5.0)
                except Exception as e:  # closing is best effort; a reward's own error must not mask others
                    logger.warning("closing reward %s raised %s", r.name, describe_exception(e))
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
        """Outcomes per sample, per reward in config order: per-sample rewards called once per sample,
        TRL-style ones once for the whole batch, all at once."""
        per_sample = [r for r in self._rewards if not r.batched]
        batched = [r for r in self._rewards if r.batched]
        results = await asyncio.gather(*(self._call(r, s) for s in samples for r in per_sample),
                                       *(self._call_batched(r, samples) for r in batched))  # fmt: skip
        n = len(per_sample)
        by_batch = dict(zip((id(r) for r in batched), results[len(samples) * n :], strict=True))
        out = []
        for i in range(len(samples)):
            cells = iter(results[i * n : (i + 1) * n])
            out.append([by_batch[id(r)][i] if r.batched else next(cells) for r in self._rewards])
        return out

    async def _call_batched(self, r: _Reward, samples: list[Sample]) -> list[_Outcome]:
        """A TRL-style reward over the whole batch: one call, one score per sample (None scores 0)."""
        rows = [s.row for s in samples]
        columns = {k: [row[k] for row in rows] for k in rows[0] if all(k in row for row in rows)} if rows else {}
        columns.pop("prompt", None)
        kwargs = {**columns, "completion_ids": [s.response_ids for s in samples], **r.kwargs}
        prompts, completions = [row.get("prompt", "") for row in rows], [s.text for s in samples]
        try:
            ok, value = await self._bounded(lambda: r.fn(prompts, completions, **kwargs), r.name, r.is_async)
        except TimeoutError:
            return [self._failed("timeout", f"timed out after {self.cfg.timeout_s}s")] * len(samples)
        if not ok:
            return [self._failed("exception", f"raised {describe_exception(value)}")] * len(samples)
        if not isinstance(value, list | tuple) or len(value) != len(samples):
            got = f"{len(value)} scores" if isinstance(value, list | tuple) else type(value).__name__
            return [self._failed("type", f"returned {got}, expected a list of {len(samples)} scores")] * len(samples)
        return [_Outcome(0.0) if v is None else self._check(v) for v in value]

    async def _call(self, r: _Reward, sample: Sample) -> _Outcome:
        timeout = self.cfg.timeout_s
        try:
            ok, value = await self._bounded(lambda: r.fn(sample, sample.row, **r.kwargs), r.name, r.is_async)
        except TimeoutError:  # Only ours: the user's own exceptions come back as (False, exc).
            return self._failed("timeout", f"timed out after {timeout}s")
        if not ok:
            return self._failed("exception", f"raised {describe_exception(value)}")
        return self._check(value)

    async def _bounded(self, fn: Callable[[], Any], name: str, is_async: bool) -> tuple[bool, Any]:
        """(ok, return value or the exception raised) of `fn()`, bounded by `rewards.timeout_s`
        (TimeoutError past it). Async callables run on this loop and are cancelled at the timeout;
        sync ones in a daemon thread, at most `max_threads` at once (an awaitable they return is
        then awaited here)."""
        timeout = self.cfg.timeout_s
        if is_async:
            return await asyncio.wait_for(_run_async(fn), timeout)
        t0 = time.monotonic()
        async with self._slots:
            ok, value = await asyncio.wait_for(self._run_in_thread(fn, name), timeout)
        if ok and inspect.isawaitable(value):
            left, awaitable = max(timeout - (time.monotonic() - t0), 1e-3), value
            ok, value = await asyncio.wait_for(_run_async(lambda: awaitable), left)
        return ok, value

    def _run_in_thread(self, fn: Callable[[], Any], name: str) -> asyncio.Future[tuple[bool, Any]]:
        loop = self._loop
        fut: asyncio.Future[tuple[bool, Any]] = loop.create_future()

        def run() -> None:
            try:
                out: tuple[bool, Any] = (True, fn())
            except BaseException as e:  # The isolation boundary: even sys.exit() in a reward is recorded.
                out = (False, e)
            try:
                loop.call_soon_threadsafe(_set_result, fut, out)
            except RuntimeError:  # The scorer was closed; nobody waits for this abandoned call.
                pass

        threading.Thread(target=run, name=f"reward-{name}", daemon=True).start()
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


async def _run_async(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, await fn()
    except Exception as e:  # CancelledError is a BaseException and passes, so wait_for can cancel.
        return False, e


def _set_result(fut: asyncio.Future[tuple[bool, Any]], out: tuple[bool, Any]) -> None:
    if not fut.done():  # Cancelled by wait_for when the call timed out.
        fut.set_result(out)


def reward_metrics(samples: list[Sample], failed: Counter[str], elapsed: float) -> dict[str, float]:
    """`reward/` metrics of a scored batch: mean, std, each function's mean, failures by kind."""
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
