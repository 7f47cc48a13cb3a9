"""The driver's side of rollout: which prompts go to which worker when, and when a step may start.

Prompts go out a rollout batch (`rollout.prompts_per_step` groups) at a time, as far ahead of the
trainer as the staleness bound allows (`may_dispatch`). Streaming (the default) hands each group to
the least loaded worker and starts a step as soon as the buffer holds enough ready groups; groups a
filter drops are replaced by new ones (over-sampling). Deterministic mode (`rollout.deterministic`)
splits each batch evenly into one seeded share per worker and starts step s when batch s is whole.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from tidal.config import RunConfig
from tidal.metrics import Metrics, mean, total, values
from tidal.rollout.buffer import BufferStatus
from tidal.rollout.queue import Work
from tidal.runtime import RunError, wait_for
from tidal.types import Prompt, SyncStats, mix_seed

POLL_S = 0.5
"""Longest a readiness wait blocks in the buffer before the driver checks on the workers."""


def may_dispatch(batch: int, step: int, version: int, published: int, minibatches: int, bound: int) -> bool:
    """Whether rollout batch `batch` may be handed to the workers before the trainer trains `step`.

    The trainer is at `version` and takes `minibatches` optimizer steps per batch (a skipped step
    takes none), so it trains batch b at a version <= version + (b - step) * minibatches; b's samples
    come from weights >= `published`, the newest offered. b fits the staleness bound when that is <=
    published + bound. The batch about to be trained is always handed out.
    """
    return batch == step or version + (batch - step) * minibatches <= published + bound


class Dispatcher:
    """Hands prompts to the serving workers and waits for each step's groups (see the module doc)."""

    def __init__(self, cfg: RunConfig, sampler: Any, workers: list[Any], buffer: Any, serving: list[Any]) -> None:
        self.cfg = cfg
        self.sampler = sampler
        self.workers = workers
        self.buffer = buffer
        self.serving = serving
        """The workers' `serve` calls: one that ends before the run does carries the worker's error."""
        self.sent = [0] * len(workers)
        self.generated: dict[int, int] = {}
        self.replaced: Counter[int] = Counter()
        self.oversampled = 0
        self.max_replace = cfg.oversample_per_batch

    def batch(self, batch: int, min_version: int) -> None:
        """Hand out rollout batch `batch`, to generate with weights >= `min_version`."""
        self._send(self.sampler.take(self.cfg.rollout.prompts_per_step), batch, min_version)

    def wait(self, step: int, version: int, published: int) -> None:
        """Block until step `step` may take its groups at trainer `version`, replacing filtered groups
        meanwhile (with weights >= `published`); a worker's failure or a wait past `ray.timeout_s`
        stops the run."""
        self._wait_on(lambda: self.buffer.wait_ready.remote(step, version, POLL_S), published,
                      f"rollout for step {step} did not finish")  # fmt: skip

    def drain(self, published: int) -> None:
        """Block until every dispatched group is in the buffer (filtered ones replaced as in `wait`),
        so that a checkpoint holds no group in flight."""
        self._wait_on(lambda: self.buffer.wait_drained.remote(POLL_S), published,
                      "the groups in flight did not land for a checkpoint")  # fmt: skip

    def _wait_on(self, poll: Callable[[], Any], published: int, what: str) -> None:
        deadline = time.monotonic() + self.cfg.ray.timeout_s
        while True:
            status: BufferStatus = wait_for(poll(), "buffer", self.cfg.ray.timeout_s)
            self.generated = status.generated
            self._check_workers()
            if self._replace_filtered(status.filtered, published):
                continue
            if status.ready:
                return
            if time.monotonic() > deadline:
                raise RunError(f"{what} within ray.timeout_s={self.cfg.ray.timeout_s:g}s; raise it for slow models, "
                               "or look for a hung actor in the run's run.log")  # fmt: skip

    def state(self) -> dict[str, Any]:
        return {"sent": self.sent, "replaced": self.replaced}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sent, self.replaced = state["sent"], state["replaced"]

    def metrics(self) -> Metrics:
        out = {"rollout/oversampled_groups": total(float(self.oversampled))}
        self.oversampled = 0
        return out

    def _replace_filtered(self, filtered: dict[int, int], published: int) -> bool:
        """Dispatch a new group for each filtered one not replaced yet, up to `filter.max_oversample`
        per batch; whether any went out."""
        sent = False
        for b, n in sorted(filtered.items()):
            extra = min(n, self.max_replace) - self.replaced[b]
            if extra <= 0:
                continue
            self.replaced[b] += extra
            self.oversampled += extra
            self._send(self.sampler.take(extra), b, published)
            sent = True
        return sent

    def _send(self, prompts: list[Prompt], batch: int, min_version: int) -> None:
        import ray

        # Counted before any of them can be put, so the buffer never sees a batch as whole too early.
        ray.get(self.buffer.dispatched.remote(batch, len(prompts)))
        n = len(self.workers)
        if self.cfg.rollout.deterministic:
            shares = [prompts[i::n] for i in range(n)]
            works = [Work(share, batch, min_version, mix_seed(self.cfg.seed, batch * n + i), fixed=True)
                     for i, share in enumerate(shares)]  # fmt: skip
        else:
            shares = [[] for _ in range(n)]
            for p in prompts:  # each to the worker with the fewest groups still to generate
                w = min(range(n), key=lambda i: self.sent[i] - self.generated.get(i, 0))
                shares[w].append(p)
                self.sent[w] += 1
            works = [Work(share, batch, min_version) for share in shares]
        for worker, work in zip(self.workers, works, strict=True):
            if work.prompts:
                worker.submit.remote(work)

    def _check_workers(self) -> None:
        import ray

        done, _ = ray.wait(self.serving, num_returns=1, timeout=0)
        if done:
            ray.get(done[0])  # raises the worker's error
            raise RunError("a rollout worker stopped serving before the run ended (see the run's run.log)")


class EvalTracker:
    """Held-out evaluations in flight on worker 0: requested without waiting, logged when they end."""

    def __init__(self, worker: Any, prompts: list[Prompt], timeout_s: float) -> None:
        self.worker = worker
        self.prompts = prompts
        self.timeout_s = timeout_s
        self.pending: list[Any] = []

    def request(self, min_version: int) -> None:
        if self.prompts:
            self.pending.append(self.worker.evaluate.remote(self.prompts, min_version))

    def collect(self, wait: bool) -> list[Metrics]:
        """The finished evaluations' metrics, oldest version first (every one still pending when
        `wait`). Two can end together when one outlasts the steps between evaluations."""
        import ray

        if not self.pending:
            return []
        if wait:
            done, self.pending = wait_for(self.pending, "held-out evaluation", self.timeout_s), []
        else:
            ready, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            done = ray.get(ready)
        return sorted(done, key=lambda m: values(m)["eval/version"])


class SyncTracker:
    """The workers' weight offers in flight: collected without blocking, so a failed sync surfaces
    as an error at the next step instead of being lost, and finished ones give sync throughput."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def add(self, refs: list[Any]) -> None:
        self.pending += refs

    def collect(self, timeout_s: float) -> Metrics:
        import ray

        if not self.pending:
            return {}
        done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=timeout_s)
        stats: list[SyncStats] = ray.get(done)  # raises the error of a failed offer
        if not stats:
            return {}
        seconds = sum(s.seconds for s in stats)
        return {
            "async/sync_bytes_per_s": mean(sum(s.nbytes for s in stats) / max(seconds, 1e-9)),
            "async/sync_time_s": mean(seconds / len(stats), float(len(stats))),
        }
