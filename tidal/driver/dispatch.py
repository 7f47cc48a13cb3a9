"""The driver's side of rollout: which prompts go to which worker when, and when a step may start.

Prompts go out a rollout batch (`rollout.prompts_per_step` groups) at a time, as far ahead of the
trainer as the staleness bound allows (`may_dispatch`). Streaming (the default) hands each group to
the least loaded worker and starts a step as soon as the buffer holds enough ready groups; groups a
filter drops are replaced by new ones (over-sampling). Deterministic mode (`rollout.deterministic`)
splits each batch evenly into one seeded share per worker and starts step s when batch s is whole.

The dispatcher keeps the groups it handed out, so that a worker's are handed out again when it fails;
what landed only the buffer knows (the dispatcher asks it, once a step and before handing anything
out again). Which workers are serving, and their restarts, are the supervisor's (`supervisor.py`),
which the dispatcher asks through `Health`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from tidal.config import RunConfig
from tidal.rollout.buffer import BufferStatus
from tidal.rollout.queue import Work
from tidal.runtime import Stalled, wait_for
from tidal.telemetry.metrics import Metrics, total
from tidal.types import Prompt, mix_seed

log = logging.getLogger(__name__)

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


class Health(Protocol):
    """What the dispatcher asks of the workers' supervisor."""

    def live(self) -> list[int]:
        """The workers to hand work to now."""
        ...

    def is_down(self, i: int) -> bool:
        """Whether worker i is being restarted (its work is kept for its new process)."""
        ...

    def check_workers(self) -> None:
        """Restart the workers that failed, bring in those whose new process is up."""
        ...


class AllServing:
    """`Health` when nothing supervises the workers (every one serving)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def live(self) -> list[int]:
        return list(range(self.n))

    def is_down(self, i: int) -> bool:
        return False

    def check_workers(self) -> None:
        pass


class Dispatcher:
    """Hands prompts to the serving workers and waits for each step's groups (see the module doc)."""

    def __init__(self, cfg: RunConfig, sampler: Any, workers: list[Any], buffer: Any) -> None:
        self.cfg = cfg
        self.sampler = sampler
        self.workers = workers
        self.buffer = buffer
        self.health: Health = AllServing(len(workers))
        """Set by the supervisor of the workers, when there is one."""
        self.sent = [0] * len(workers)
        self.generated: dict[int, int] = {}
        self.replaced: Counter[int] = Counter()
        self.oversampled = 0
        self.max_replace = cfg.oversample_per_batch
        self.in_flight: dict[int, tuple[int, Work]] = {}
        """Groups handed out and not seen landed by the buffer when last asked, by group id: (worker,
        the work to hand out again)."""

    def batch(self, batch: int, min_version: int) -> None:
        """Hand out rollout batch `batch`, to generate with weights >= `min_version`."""
        self._send(self.sampler.take(self.cfg.rollout.prompts_per_step), batch, min_version)

    def wait(self, step: int, version: int, published: int) -> None:
        """Block until step `step` may take its groups at trainer `version`, replacing filtered groups
        meanwhile (with weights >= `published`); a worker's failure or a wait past `ray.stall_timeout_s`
        stops the run."""
        self._wait_on(
            lambda: self.buffer.wait_ready.remote(step, version, POLL_S),
            published,
            f"rollout for step {step} did not finish",
        )

    def drain(self, published: int) -> None:
        """Block until every dispatched group is in the buffer (filtered ones replaced as in `wait`),
        so that a checkpoint holds no group in flight."""
        self._wait_on(
            lambda: self.buffer.wait_drained.remote(POLL_S),
            published,
            "the groups in flight did not land for a checkpoint",
        )

    def _wait_on(self, poll: Callable[[], Any], published: int, what: str) -> None:
        deadline = time.monotonic() + self.cfg.ray.stall_timeout_s
        while True:
            status: BufferStatus = wait_for(poll(), "buffer", self.cfg.ray.stall_timeout_s)
            landed = sum(status.generated.values()) - sum(self.generated.values())
            self._account(status)
            if landed:  # progress: the bound is on a wait that sees none
                deadline = time.monotonic() + self.cfg.ray.stall_timeout_s
            self.health.check_workers()
            if self._replace_filtered(status.filtered, published):
                continue
            if status.ready:
                self._drop_landed(list(self.in_flight))
                return
            if time.monotonic() > deadline:
                raise Stalled(
                    f"{what}: no group landed within ray.stall_timeout_s={self.cfg.ray.stall_timeout_s:g}s; "
                    "raise it for slow models"
                )

    def state(self) -> dict[str, Any]:
        """The dispatcher's part of a checkpoint; groups still in flight (a checkpoint written when a
        worker was lost) are handed out again on resume."""
        return {"sent": self.sent, "replaced": self.replaced, "in_flight": self.in_flight}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sent, self.replaced = state["sent"], state["replaced"]
        self.in_flight = state.get("in_flight", {})

    def settle(self) -> None:
        """Account for the groups that landed once the workers stopped: those still in flight are the
        ones to hand out again."""
        self._account(wait_for(self.buffer.wait_drained.remote(0.0), "buffer", self.cfg.ray.stall_timeout_s))
        self._drop_landed(list(self.in_flight))

    def _account(self, status: BufferStatus) -> None:
        """What the buffer reports: the groups generated per worker."""
        self.generated = status.generated

    def resubmit(self, min_version: int) -> None:
        """Hand out again the groups a resumed checkpoint holds in flight, to the workers that had them,
        with weights >= `min_version` (the versions they were dispatched for are gone with the run)."""
        self._drop_landed(list(self.in_flight))  # put after the checkpoint's status
        again: dict[int, tuple[int, Work]] = {}  # by the id of the work saved: a fixed share once
        for gid, (i, work) in self.in_flight.items():
            if id(work) not in again:
                again[id(work)] = (i, replace(work, min_version=max(work.min_version, min_version)))
                self.workers[i].submit.remote(again[id(work)][1])
            self.in_flight[gid] = again[id(work)]
        if again:
            log.info("handing out again %d groups in flight when the checkpoint was written", len(self.in_flight))

    def metrics(self) -> Metrics:
        out = {"rollout/oversampled_groups": total(float(self.oversampled))}
        self.oversampled = 0
        return out

    def oldest_min_version(self, default: int) -> int:
        """The oldest version a group in flight was dispatched for (`default` with none in flight)."""
        return min((w.min_version for _, w in self.in_flight.values()), default=default)

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
        # Counted before any of them can be put, so the buffer never sees a batch as whole too early.
        wait_for(self.buffer.dispatched.remote(batch, len(prompts)), "buffer", self.cfg.ray.stall_timeout_s)
        n, live = len(self.workers), self.health.live()
        if self.cfg.rollout.deterministic:  # share i keeps its seed, on another worker while i restarts
            works = [
                (
                    i if i in live else live[i % len(live)],
                    Work(prompts[i::n], batch, min_version, mix_seed(self.cfg.seed, batch * n + i), fixed=True),
                )
                for i in range(n)
            ]
        else:  # each prompt to the worker with the fewest groups still to generate
            load = {i: self._outstanding(i) for i in live}
            shares: dict[int, list[Prompt]] = {}
            for p in prompts:
                i = min(live, key=load.__getitem__)
                load[i] += 1
                shares.setdefault(i, []).append(p)
            works = [(i, Work(share, batch, min_version)) for i, share in shares.items()]
        for i, work in works:
            if work.prompts:
                self._hand(i, work)

    def _least_loaded(self, among: list[int]) -> int:
        return min(among, key=self._outstanding)

    def _outstanding(self, i: int) -> int:
        """Groups handed to worker i that it has still to generate."""
        return self.sent[i] - self.generated.get(i, 0)

    def works_of(self, i: int) -> list[Work]:
        """The work in flight on worker i, each once (a deterministic share holds several groups)."""
        self._drop_landed([gid for gid, (w, _) in self.in_flight.items() if w == i])
        return list({id(work): work for w, work in self.in_flight.values() if w == i}.values())

    def _hand(self, i: int, work: Work) -> None:
        """Give `work` to worker i: now, or once its new process is in. Its groups are tracked each
        on its own (handed out again one by one), a deterministic share as a whole."""
        for p in work.prompts:
            self.in_flight[p.group_id] = (i, work if work.fixed else Work([p], work.batch_id, work.min_version))
        self.sent[i] += len(work.prompts)
        if not self.health.is_down(i):
            self.workers[i].submit.remote(work)

    def hand_over(self, i: int) -> int:
        """Worker i's groups in flight, to the live workers (kept for i when there is none): the same
        prompts, group ids and batches (a deterministic share with its seed), less those the buffer
        says landed. A copy that still lands from the failed process is dropped by the buffer. How
        many were handed over."""
        lost = self._drop_landed([gid for gid, (w, _) in self.in_flight.items() if w == i])
        self.sent[i] -= len(lost)
        for work in self.works_of(i):
            self._hand(self._least_loaded(self.health.live()), work)
        return len(lost)

    def _drop_landed(self, gids: list[int]) -> list[int]:
        """Of `gids`, those still in flight: the ones the buffer says landed leave `in_flight`."""
        if not gids:
            return []
        for gid in wait_for(self.buffer.landed_among.remote(gids), "buffer", self.cfg.ray.stall_timeout_s):
            self.in_flight.pop(gid)
        return [gid for gid in gids if gid in self.in_flight]
