"""Score a batch of samples with the configured rewards: all calls at once, each bounded and isolated.

A call that raises, runs past `rewards.timeout_s`, returns NaN / inf or a wrong type is recorded on
its sample (`reward_errors`), scores `rewards.failure_reward`, and the run goes on. One that failed
transiently (timed out, lost its connection, got HTTP 429 / 5xx) is first tried again, up to
`rewards.retries` times.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import statistics
import sys
import time
import urllib.error
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from numbers import Real
from typing import Any

import httpx

from tidal.config import RewardsConfig, RewardSpec
from tidal.plugins import (
    BoundedCalls,
    PluginRef,
    describe_exception,
    import_object,
    is_async,
    load_plugin,
    plugin_ref,
    start_forkserver,
)
from tidal.rewards.base import RewardResult, is_trl_style
from tidal.rewards.builtins import BUILTINS
from tidal.rewards.loading import resolve_rewards
from tidal.rewards.remote import RemoteJudge
from tidal.telemetry.metrics import Metrics, largest, mean, spread, total
from tidal.types import Sample

logger = logging.getLogger(__name__)

FAILURE_KINDS = ("timeout", "exception", "nan", "type")
"""Why a call failed; each is counted under `reward/failed_<kind>`."""

_RETRY_DELAY_S = 0.5
"""Wait before the first retry of a batch's transiently failed calls, doubled before each next one:
a refused connection fails again at once, a server restarting needs a moment."""


@dataclass
class _Reward:
    name: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    weight: float
    is_async: bool
    batched: bool = False
    """TRL's form: called once per batch as fn(prompts, completions, **columns) -> list of scores."""
    ref: PluginRef | None = None
    """How a reward process loads a sync reward; None: it runs in threads of this process."""
    retries: int = 0
    """Further attempts after a transient failure (0 for a reward that retries on its own)."""


@dataclass
class _Outcome:
    """One call's result: crosses the process boundary, so it holds only plain values."""

    score: float = 0.0
    sub_scores: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    """One of FAILURE_KINDS, None on success."""
    reason: str = ""
    transient: bool = False
    """A failure worth another attempt (`is_transient`)."""
    attempts: int = 1


class RewardScorer:
    """Resolves `rewards.functions` once, then scores batches: `score(samples) -> metrics`.

    Every call runs through `BoundedCalls` (`tidal.plugins`): async rewards on one long-lived event
    loop, cancelled at the timeout; sync ones a fresh process can load (built-ins, and classes or
    top-level functions named by import or file path) in a pool of processes, where a call past the
    timeout is killed; other sync ones (an env's `score`, a function made at run time) in daemon
    threads, abandoned at the timeout. A reward in a process gets a copy of the sample without its
    `routing`, and its kwargs and return value must pickle.
    """

    def __init__(
        self,
        cfg: RewardsConfig,
        max_threads: int = 16,
        rewards: list[tuple[str, Callable[..., Any], dict[str, Any], float]] | None = None,
        refs: list[PluginRef | None] | None = None,
    ) -> None:
        """`rewards` (name, callable, kwargs, weight) replaces `cfg.functions` (e.g. an env's score and
        its extra rewards); `cfg` still gives the timeout, the retries and the failure reward. Of
        those, the top-level functions run in processes, and any other that `refs` gives a ref for
        (an env's `score` with `isolation: process`; an instance's kwargs are unknown here)."""
        self.cfg = cfg
        if rewards is None:
            resolved = resolve_rewards(cfg)
            rewards = [(n, fn, kw, spec.weight) for (n, fn, kw), spec in zip(resolved, cfg.functions, strict=True)]
            refs = [_spec_ref(spec) for spec in cfg.functions]
        else:
            given = refs or [None] * len(rewards)
            refs = [
                ref if ref is not None else plugin_ref(fn) if inspect.isfunction(fn) else None
                for ref, (_, fn, _, _) in zip(given, rewards, strict=True)
            ]
        self._rewards = [
            _Reward(
                n,
                fn,
                kw,
                w,
                is_async(fn),
                is_trl_style(fn),
                ref=None if is_async(fn) else ref,
                # The judge retries its own requests (its kwargs.retries); retrying its calls would multiply them.
                retries=0 if isinstance(fn, RemoteJudge) else cfg.retries,
            )
            for (n, fn, kw, w), ref in zip(rewards, refs, strict=True)
        ]
        preload = [r.ref for r in self._rewards if r.ref is not None]
        self.calls = BoundedCalls(cfg.timeout_s, max_threads, preload)
        if preload:
            # The reward processes' forkserver imports tidal (seconds) now, in the background, while the
            # worker loads its model, instead of at the first score; the pool itself waits for that score.
            start_forkserver([__name__])

    @property
    def names(self) -> list[str]:
        """Log names of the reward functions, in config order."""
        return [r.name for r in self._rewards]

    def score(self, samples: list[Sample]) -> Metrics:
        """Fill each sample's `reward`, `scores` and `reward_errors`; return `reward/...` metrics of the batch."""
        start = time.perf_counter()
        outcomes = self.calls.submit(self._score_all(samples))
        failed: Counter[str] = Counter()
        retried = 0
        for sample, outs in zip(samples, outcomes, strict=True):
            sample.scores = {}  # reward_errors may already hold an env's failed steps: kept
            for r, o in zip(self._rewards, outs, strict=True):
                sample.scores[r.name] = self.cfg.failure_reward if o.failure else o.score
                sample.scores.update({f"{r.name}/{k}": v for k, v in o.sub_scores.items()})
                retried += o.attempts > 1
                if o.failure is not None:
                    failed[o.failure] += 1
                    tries = f" ({o.attempts} attempts)" if o.attempts > 1 else ""
                    sample.reward_errors.append(f"{r.name}: {o.reason}{tries}")
            sample.reward = sum(r.weight * sample.scores[r.name] for r in self._rewards)
        if failed:
            first = next(e for s in samples for e in s.reward_errors)
            n_calls = len(samples) * len(self._rewards)
            logger.warning("%d of %d reward calls failed; first: %s", sum(failed.values()), n_calls, first)
        return reward_metrics(samples, failed, time.perf_counter() - start, retried)

    def close(self) -> None:
        """Close rewards that hold resources (an `aclose()` coroutine, e.g. a remote judge's HTTP
        client), then stop the reward processes and the calls' event loop."""
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
        """Outcomes per sample, per reward in config order, every reward at once."""
        columns = await asyncio.gather(*(self._column(r, samples) for r in self._rewards))
        return [[column[i] for column in columns] for i in range(len(samples))]

    async def _column(self, r: _Reward, samples: list[Sample]) -> list[_Outcome]:
        """Reward `r` of every sample; the calls that failed transiently are tried again, all together,
        up to `r.retries` times (a TRL-style call fails or succeeds for the whole batch at once)."""
        out = await self._attempt(r, samples)
        for attempt in range(2, r.retries + 2):
            again = [i for i, o in enumerate(out) if o.failure is not None and o.transient]
            if not again:
                break
            await asyncio.sleep(_RETRY_DELAY_S * 2 ** (attempt - 2))
            outcomes = await self._attempt(r, [samples[i] for i in again])
            for i, o in zip(again, outcomes, strict=True):
                out[i] = replace(o, attempts=attempt)
        return out

    async def _attempt(self, r: _Reward, samples: list[Sample]) -> list[_Outcome]:
        """One call of `r` per sample (sync ones in processes or a few threads, async ones on the
        loop), or one for the whole batch if it is TRL-style."""
        if r.batched:
            return await self._call_batched(r, samples)
        if r.is_async:
            return list(await asyncio.gather(*(self._call_async(r, s) for s in samples)))
        if r.ref is not None:
            calls = (self._in_process(_score_one, r.ref, *_args(s), r.kwargs) for s in samples)
            return list(await asyncio.gather(*calls))
        results = await self.calls.bounded_each([partial(r.fn, s, s.row, **r.kwargs) for s in samples], r.name)
        return [self._timed_out() if res is None else _outcome(*res) for res in results]

    async def _call_batched(self, r: _Reward, samples: list[Sample]) -> list[_Outcome]:
        """A TRL-style reward over the whole batch: one call, one score per sample (None scores 0)."""
        rows = [s.row for s in samples]
        columns = {k: [row[k] for row in rows] for k in rows[0] if all(k in row for row in rows)} if rows else {}
        columns.pop("prompt", None)
        kwargs = {**columns, "completion_ids": [s.response_ids for s in samples], **r.kwargs}
        prompts, completions = [row.get("prompt", "") for row in rows], [s.text for s in samples]
        if r.ref is not None:
            out = await self._in_process(_score_batch, r.ref, prompts, completions, kwargs, len(samples))
            return out if isinstance(out, list) else [out] * len(samples)
        try:
            ok, value = await self.calls.bounded(lambda: r.fn(prompts, completions, **kwargs), r.name, r.is_async)
        except TimeoutError:
            return [self._timed_out()] * len(samples)
        return _batch_outcomes(ok, value, len(samples))

    async def _call_async(self, r: _Reward, sample: Sample) -> _Outcome:
        try:
            ok, value = await self.calls.bounded(lambda: r.fn(sample, sample.row, **r.kwargs), r.name, True)
        except TimeoutError:  # Only ours: the user's own exceptions come back as (False, exc).
            return self._timed_out()
        return _outcome(ok, value)

    async def _in_process(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a reward process: its outcome(s), or the failure of a call the pool killed at
        the timeout or could not run."""
        try:
            return await self.calls.in_process(fn, *args)
        except TimeoutError:
            return self._timed_out()
        except Exception as e:  # its process died (a crash, os._exit) or an argument does not pickle
            return _raised(e)

    def _timed_out(self) -> _Outcome:
        return _Outcome(failure="timeout", reason=f"timed out after {self.cfg.timeout_s}s", transient=True)


def _spec_ref(spec: RewardSpec) -> PluginRef | None:
    """How a reward process loads the reward of `spec` (already resolved here once, so it resolves)."""
    obj = BUILTINS[spec.name] if spec.name is not None else import_object(str(spec.path), "")
    return plugin_ref(obj, spec.kwargs if isinstance(obj, type) else None)


def _args(sample: Sample) -> tuple[Sample, dict[str, Any]]:
    """A per-sample call's arguments for a reward process: the routing (a tensor, large, of no use to a
    reward) stays here."""
    return (sample if sample.routing is None else replace(sample, routing=None)), sample.row


# ------------------------------------------------------------------------------- in reward processes


def _score_one(ref: PluginRef, sample: Sample, row: dict[str, Any], kwargs: dict[str, Any]) -> _Outcome:
    """A per-sample call in a reward process, checked there: only the outcome comes back."""
    return _outcome(*_call(ref, sample, row, **kwargs))


def _score_batch(
    ref: PluginRef, prompts: list[Any], completions: list[str], kwargs: dict[str, Any], n: int
) -> list[_Outcome]:
    """A TRL-style call in a reward process, checked there."""
    return _batch_outcomes(*_call(ref, prompts, completions, **kwargs), n)


def _call(ref: PluginRef, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    try:
        value = load_plugin(ref)(*args, **kwargs)
        if inspect.isawaitable(value):  # a sync callable may return an awaitable, as on the loop
            value = asyncio.run(_awaited(value))
        return True, value
    except BaseException as e:  # The isolation boundary: even sys.exit() in user code is recorded.
        return False, e


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


# ---------------------------------------------------------------------------------------- outcomes


def _outcome(ok: bool, value: Any) -> _Outcome:
    """A call's (ok, return value or exception) as an outcome."""
    return _checked(value) if ok else _raised(value)


def _batch_outcomes(ok: bool, value: Any, n: int) -> list[_Outcome]:
    """A TRL-style call's (ok, return value or exception) as one outcome per sample (None scores 0)."""
    if not ok:
        return [_raised(value)] * n
    if not isinstance(value, list | tuple) or len(value) != n:
        got = f"{len(value)} scores" if isinstance(value, list | tuple) else type(value).__name__
        return [_Outcome(failure="type", reason=f"returned {got}, expected a list of {n} scores")] * n
    return [_Outcome(0.0) if v is None else _checked(v) for v in value]


def _raised(e: BaseException) -> _Outcome:
    return _Outcome(failure="exception", reason=f"raised {describe_exception(e)}", transient=is_transient(e))


def _checked(value: Any) -> _Outcome:
    score, subs = (value.score, value.sub_scores) if isinstance(value, RewardResult) else (value, {})
    if not isinstance(subs, dict):
        return _Outcome(failure="type", reason=f"returned sub_scores of type {type(subs).__name__}, expected a dict")
    for where, v in [("", score), *((f" in sub-score {k!r}", s) for k, s in subs.items())]:
        # bool is an int and numpy scalars register as Real, so both pass.
        if not isinstance(v, Real):
            expected = "a number" if where else "a number or RewardResult"
            return _Outcome(failure="type", reason=f"returned {type(v).__name__}{where}, expected {expected}")
        if not math.isfinite(v):
            return _Outcome(failure="nan", reason=f"returned {'NaN' if math.isnan(v) else float(v)}{where}")
    return _Outcome(float(score), {str(k): float(s) for k, s in subs.items()})


def is_transient(e: BaseException) -> bool:
    """A failure another attempt may not repeat: a refused or lost connection, a timeout, HTTP 429 or 5xx
    (from httpx, requests or urllib). Anything else, a ValueError say, fails the same way again."""
    if isinstance(e, ConnectionError | TimeoutError | httpx.TransportError):
        return True
    requests = sys.modules.get("requests")  # only a reward that imported requests can raise its errors
    if requests is not None and isinstance(e, requests.ConnectionError | requests.Timeout):
        return True
    # httpx.HTTPStatusError and requests.HTTPError carry the response, urllib's HTTPError its code.
    response = getattr(e, "response", None)
    status = e.code if isinstance(e, urllib.error.HTTPError) else getattr(response, "status_code", None)
    return isinstance(status, int) and (status == 429 or status >= 500)


def reward_metrics(samples: list[Sample], failed: Counter[str], elapsed: float, retried: int) -> Metrics:
    """`reward/` metrics of a scored batch: mean, std, each function's mean, failures by kind, and
    the calls retried after a transient failure, whether or not a retry succeeded."""
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
    metrics["reward/retried"] = total(float(retried))
    metrics["reward/score_time_s"] = largest(elapsed)  # scorers of several workers run side by side
    return metrics
