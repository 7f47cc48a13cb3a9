"""The TrajectoryBuffer: scored groups in, filtered and staleness-checked training batches out.

`TrajectoryBuffer` is plain, thread-safe logic (tested without Ray) and becomes the buffer actor with
`ray.remote(max_concurrency=...)(TrajectoryBuffer)`: workers put groups while the driver waits for a
step's groups to be ready and the trainer takes them. Every group carries the rollout batch it was
dispatched for (`batch_id`: a batch is one trainer step's prompts). Two ways to take a step's groups:

- streaming (`per_step=n`): step s takes the n oldest groups that are ready and fresh, whatever batch
  they came from, so the trainer never waits for the slowest group of a batch;
- deterministic (`per_step=None`): step s takes exactly the groups of batch s, once all are in.

Nothing leaves silently: every dropped sample or group is counted under a named metric, and the
running totals (`ledger()`) account for every group ever dispatched.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from tidal.config import FilterConfig
from tidal.telemetry.metrics import Metrics, merge, total
from tidal.types import Group


def filter_group(group: Group, cfg: FilterConfig, counts: Counter[str]) -> Group | None:
    """Apply the sample filters, then the zero-variance group filter; None when the group is dropped.

    Sample filters leave groups of unequal size; advantages are then normalised per group.
    """
    samples = group.samples
    if cfg.drop_truncated:
        kept = [s for s in samples if s.finish_reason != "length"]
        counts["rollout/filtered_truncated_samples"] += len(samples) - len(kept)
        samples = kept
    if cfg.drop_failed_rewards:
        kept = [s for s in samples if not s.failed]
        counts["rollout/filtered_failed_reward_samples"] += len(samples) - len(kept)
        samples = kept
    if not samples:
        counts["rollout/filtered_empty_groups"] += 1
        return None
    if cfg.zero_variance and len({s.reward for s in samples}) == 1:
        counts["rollout/filtered_zero_variance_groups"] += 1
        counts["rollout/filtered_zero_variance_samples"] += len(samples)
        return None
    return Group(group.group_id, samples)


class LandedIds:
    """A set of group ids that stays small over a run: ids are handed out counting up from 0 and
    nearly all land in that order, so those below the lowest one not landed are kept as that bound."""

    def __init__(self) -> None:
        self.below = 0
        """Every id in [0, below) has landed."""
        self.above: set[int] = set()
        """The other ids landed."""

    def add(self, gid: int) -> None:
        self.above.add(gid)
        while self.below in self.above:
            self.above.remove(self.below)
            self.below += 1

    def __contains__(self, gid: int) -> bool:
        return 0 <= gid < self.below or gid in self.above


@dataclass(frozen=True)
class BufferStatus:
    """What the driver reads while it waits for a step: whether the step may start, and the counts it
    dispatches by (over-sampling replaces filtered groups; new groups go to the least loaded worker)."""

    ready: bool
    filtered: dict[int, int]
    """Groups that will train nothing so far (filtered out, or with streaming dropped as too stale),
    by the batch they were dispatched for: over-sampling replaces them."""
    generated: dict[int, int]
    """Groups put so far, by worker index."""


class TrajectoryBuffer:
    """Filtered groups with the batch each was dispatched for; the staleness bound applied at take.

    A group of version v is handed out only while the trainer's version is <= v + max_staleness;
    older groups are dropped and counted in `async/dropped_stale_groups` / `_samples`. The driver
    dispatches prompts only as far ahead as the bound allows, so such drops are the exception.
    """

    def __init__(self, cfg: FilterConfig, max_staleness: int, per_step: int | None = None) -> None:
        self.cfg = cfg
        self.max_staleness = max_staleness
        self.per_step = per_step
        """Streaming: groups per step, the oldest ready ones. None: step s takes batch s whole."""
        self.batches: defaultdict[int, list[Group]] = defaultdict(list)
        self.pending: Counter[int] = Counter()
        """Groups dispatched and not yet put, by batch."""
        self.filtered: Counter[int] = Counter()
        self.generated_by_worker: Counter[int] = Counter()
        self.metrics: list[Metrics] = []
        """The workers' rollout metrics since the last `pop_counts`."""
        self.counts: Counter[str] = Counter()
        """Per-step counters, cleared by `pop_counts`."""
        self.totals: Counter[str] = Counter()
        """Run totals of groups by fate: dispatched = generated + in flight; generated = filtered +
        dropped_stale + taken + still held."""
        self.landed = LandedIds()
        """Every group put, the one record of what landed (the driver asks it, `landed_among`): a
        group handed out again after its worker failed lands once, whichever copy comes first (a late
        one from the failed worker, or the new one); later copies are dropped and counted
        (`fault/duplicate_groups`)."""
        self._cv = threading.Condition()

    def dispatched(self, batch_id: int, n: int) -> None:
        """`n` groups of `batch_id` were handed to the workers (called before they can be put)."""
        with self._cv:
            self.pending[batch_id] += n
            self.totals["dispatched_groups"] += n

    def put(self, groups: list[Group], batch_id: int = 0, metrics: Metrics | None = None, worker: int = 0) -> int:
        """Filter and hold `groups` of `batch_id`, with the rollout metrics of the call that made
        them; returns the number of groups kept."""
        with self._cv:
            groups = self._first_copies(groups)
            counts: Counter[str] = Counter()
            kept = [g for g in (filter_group(g, self.cfg, counts) for g in groups) if g is not None]
            self.counts.update(counts)
            self._count("rollout/groups_generated", len(groups))
            self._count("rollout/groups_kept", len(kept))
            self.totals["filtered_groups"] += len(groups) - len(kept)
            self.filtered[batch_id] += len(groups) - len(kept)
            self.pending[batch_id] = max(self.pending[batch_id] - len(groups), 0)
            self.generated_by_worker[worker] += len(groups)
            for g in kept:
                g.batch_id, g.worker = batch_id, worker
            self.batches[batch_id].extend(kept)
            if metrics:
                self.metrics.append(metrics)
            self._cv.notify_all()
            return len(kept)

    def landed_among(self, group_ids: list[int]) -> list[int]:
        """Of `group_ids`, which the driver handed out, those that landed (the driver stops tracking
        them as in flight, and does not hand them out again when their worker fails)."""
        with self._cv:
            return [gid for gid in group_ids if gid in self.landed]

    def _first_copies(self, groups: list[Group]) -> list[Group]:
        """`groups` less the copies of groups landed already, which are counted."""
        out = []
        for g in groups:
            if g.group_id in self.landed:
                self._count("fault/duplicate_groups", 1)
                continue
            self.landed.add(g.group_id)
            out.append(g)
        return out

    def _status(self, ready: bool) -> BufferStatus:
        return BufferStatus(ready, dict(self.filtered), dict(self.generated_by_worker))

    def ready(self, step: int, trainer_version: int) -> bool:
        """Whether step `step` may take its groups now: deterministic, when every group of batch
        `step` is in; streaming, when `per_step` fresh groups are held, or when no group of a batch
        <= `step` is still being generated (the step then trains on what there is)."""
        with self._cv:
            if self.per_step is None:
                return self.pending[step] == 0
            fresh = sum(not self._stale(g, trainer_version) for b in self.batches.values() for g in b)
            return fresh >= self.per_step or not any(n for b, n in self.pending.items() if b <= step)

    def wait_ready(self, step: int, trainer_version: int, timeout_s: float) -> BufferStatus:
        """Block up to `timeout_s` for `ready(step, trainer_version)`; the status either way. With
        streaming, groups already too stale for the step are dropped first (the trainer's version only
        grows): a slow worker's groups that fresher ones overtook. They count with the filtered ones,
        so that over-sampling replaces them before the step starts (it would otherwise train short)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                if self.per_step is not None:
                    self._drop_stale(trainer_version)
                if (ok := self.ready(step, trainer_version)) or (left := deadline - time.monotonic()) <= 0:
                    return self._status(ok)
                self._cv.wait(left)

    def _drop_stale(self, trainer_version: int) -> None:
        for b, gs in list(self.batches.items()):
            for g in [g for g in gs if self._stale(g, trainer_version)]:
                self._count("async/dropped_stale_groups", 1)
                self.counts["async/dropped_stale_samples"] += len(g.samples)
                self.filtered[b] += 1
                self._remove(g)

    def take(self, step: int, trainer_version: int) -> list[Group]:
        """The groups step `step` trains at `trainer_version` (they leave the buffer): batch `step`,
        or with streaming the `per_step` oldest fresh groups. Stale groups met on the way are
        dropped and counted."""
        with self._cv:
            if self.per_step is None:  # in group order, not arrival order: a run does not depend on timing
                candidates = sorted(self.batches.pop(step, []), key=lambda g: g.group_id)
            else:
                candidates = sorted(
                    ((b, g) for b, gs in self.batches.items() for g in gs), key=lambda bg: (bg[0], bg[1].group_id)
                )
                candidates = [g for _, g in candidates]
            out: list[Group] = []
            for g in candidates:
                if self.per_step is not None and len(out) == self.per_step:
                    break
                if self._stale(g, trainer_version):
                    self._count("async/dropped_stale_groups", 1)
                    self.counts["async/dropped_stale_samples"] += len(g.samples)
                else:
                    out.append(g)
                self._remove(g)
            self.totals["taken_groups"] += len(out)
            return out

    def _stale(self, g: Group, trainer_version: int) -> bool:
        return trainer_version > g.version + self.max_staleness

    def _remove(self, g: Group) -> None:
        for b, gs in list(self.batches.items()):
            if any(x is g for x in gs):
                gs[:] = [x for x in gs if x is not g]
                if not gs:
                    del self.batches[b]
                return

    def size(self) -> int:
        """Groups held."""
        with self._cv:
            return sum(len(b) for b in self.batches.values())

    def pop_counts(self) -> Metrics:
        """Counters and the workers' rollout metrics since the last call (per-step metrics), plus the
        buffer fill and the groups still being generated."""
        with self._cv:
            out = merge([*self.metrics, {k: total(float(v)) for k, v in self.counts.items()}])
            self.metrics.clear()
            self.counts.clear()
            out["async/buffer_groups"] = total(float(sum(len(b) for b in self.batches.values())))
            out["async/buffer_batches"] = total(float(sum(1 for b in self.batches.values() if b)))
            out["async/in_flight_groups"] = total(float(sum(self.pending.values())))
            return out

    def ledger(self) -> dict[str, int]:
        """Run totals: `dispatched_groups` = `generated_groups` + `in_flight_groups`, and
        `generated_groups` = `filtered_groups` + `dropped_stale_groups` + `taken_groups` +
        `held_groups`, so no group is lost without a count."""
        with self._cv:
            return {
                "dispatched_groups": self.totals["dispatched_groups"],
                "in_flight_groups": sum(self.pending.values()),
                "generated_groups": self.totals["rollout/groups_generated"],
                "filtered_groups": self.totals["filtered_groups"],
                "dropped_stale_groups": self.totals["async/dropped_stale_groups"],
                "taken_groups": self.totals["taken_groups"],
                "held_groups": sum(len(b) for b in self.batches.values()),
            }

    STATE = ("batches", "pending", "filtered", "generated_by_worker", "metrics", "counts", "totals", "landed")

    def state(self) -> dict[str, object]:
        """What a checkpoint keeps: the groups held, with their tokens, and every count."""
        with self._cv:
            return {k: getattr(self, k) for k in self.STATE}

    def load_state(self, state: dict[str, object]) -> None:
        with self._cv:
            for k in self.STATE:  # (a checkpoint written before a field existed keeps its default)
                setattr(self, k, state.get(k, getattr(self, k)))

    def wait_drained(self, timeout_s: float) -> BufferStatus:
        """Block up to `timeout_s` until no dispatched group is still being generated; `ready` says
        whether none is."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (busy := any(self.pending.values())) and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            return self._status(not busy)

    def _count(self, key: str, n: int) -> None:
        self.counts[key] += n
        self.totals[key] += n
