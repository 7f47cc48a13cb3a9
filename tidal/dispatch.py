"""The driver's side of rollout: which prompts go to which worker when, and when a step may start.

Prompts go out a rollout batch (`rollout.prompts_per_step` groups) at a time, as far ahead of the
trainer as the staleness bound allows (`may_dispatch`). Streaming (the default) hands each group to
the least loaded worker and starts a step as soon as the buffer holds enough ready groups; groups a
filter drops are replaced by new ones (over-sampling). Deterministic mode (`rollout.deterministic`)
splits each batch evenly into one seeded share per worker and starts step s when batch s is whole.

A worker that dies is restarted (Ray's actor restarts, `rollout.max_worker_restarts`): the driver
gives the new process the weight sync and the newest weights, starts its serving loop again, and
hands it the groups its predecessor had not landed in the buffer, as they were (same prompts, group
ids, batches; a deterministic share with its seed), less those the buffer says landed meanwhile.
The buffer keeps the first copy of a group handed out twice, so nothing is lost or trained twice.
A failure counts against `rollout.max_worker_restarts` wherever it is noticed: the serving loop
ending, the restart's check of the process, the new process dying before it answers or while it
rejoins.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from tidal.config import RunConfig
from tidal.metrics import Metrics, largest, mean, total, values
from tidal.rollout.buffer import BufferStatus
from tidal.rollout.queue import Work
from tidal.runtime import RunError, Stalled, actor_error_line, wait_for
from tidal.types import Prompt, SyncStats, mix_seed
from tidal.weight_sync import WeightHandle

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
        self.in_flight: dict[int, tuple[int, Work]] = {}
        """Groups handed out and not landed yet, by group id: (worker, the work to hand out again)."""
        self.handles: dict[int, WeightHandle] = {}
        """Published versions a restarted worker may need, by version (see `published`)."""
        self.restarts = [0] * len(workers)
        self.faults: Counter[str] = Counter()
        """`fault/` counts since the last `metrics()`."""
        self.restart_s: list[float] = []
        self.reform: Callable[[], None] | None = None
        """Set by the driver: re-forms the broadcast group and sends the weights again (a restart)."""
        self.down: dict[int, _Restart] = {}
        """Workers being restarted: no work is handed to them until their new process is in."""

    def batch(self, batch: int, min_version: int) -> None:
        """Hand out rollout batch `batch`, to generate with weights >= `min_version`."""
        self._send(self.sampler.take(self.cfg.rollout.prompts_per_step), batch, min_version)

    def wait(self, step: int, version: int, published: int) -> None:
        """Block until step `step` may take its groups at trainer `version`, replacing filtered groups
        meanwhile (with weights >= `published`); a worker's failure or a wait past `ray.stall_timeout_s`
        stops the run."""
        self._wait_on(lambda: self.buffer.wait_ready.remote(step, version, POLL_S), published,
                      f"rollout for step {step} did not finish")  # fmt: skip

    def drain(self, published: int) -> None:
        """Block until every dispatched group is in the buffer (filtered ones replaced as in `wait`),
        so that a checkpoint holds no group in flight."""
        self._wait_on(lambda: self.buffer.wait_drained.remote(POLL_S), published,
                      "the groups in flight did not land for a checkpoint")  # fmt: skip

    def _wait_on(self, poll: Callable[[], Any], published: int, what: str) -> None:
        deadline = time.monotonic() + self.cfg.ray.stall_timeout_s
        while True:
            status: BufferStatus = wait_for(poll(), "buffer", self.cfg.ray.stall_timeout_s)
            self._account(status)
            if status.landed:  # progress: the bound is on a wait that sees none
                deadline = time.monotonic() + self.cfg.ray.stall_timeout_s
            self.check_workers()
            if self._replace_filtered(status.filtered, published):
                continue
            if status.ready:
                return
            if time.monotonic() > deadline:
                raise Stalled(f"{what}: no group landed within ray.stall_timeout_s={self.cfg.ray.stall_timeout_s:g}s; "
                              "raise it for slow models")  # fmt: skip

    def state(self) -> dict[str, Any]:
        """The dispatcher's part of a checkpoint; groups still in flight (a checkpoint written when a
        worker was lost, see `settle`) are handed out again on resume."""
        return {"sent": self.sent, "replaced": self.replaced, "restarts": self.restarts, "in_flight": self.in_flight}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sent, self.replaced = state["sent"], state["replaced"]
        self.restarts = state.get("restarts", self.restarts)
        self.in_flight = state.get("in_flight", {})

    def settle(self) -> None:
        """Stop every worker (the live ones after their current generate call) and account for the
        groups that landed: those still in flight are the ones to hand out again."""
        import ray

        for worker in self.workers:
            worker.stop.remote()
        ray.wait(self.serving, num_returns=len(self.serving), timeout=self.cfg.ray.stall_timeout_s)
        self._account(wait_for(self.buffer.wait_drained.remote(0.0), "buffer", self.cfg.ray.stall_timeout_s))

    def _account(self, status: BufferStatus) -> None:
        """What the buffer reports: groups generated per worker, and the groups landed (no longer in flight)."""
        self.generated = status.generated
        for gid in status.landed:
            self.in_flight.pop(gid, None)

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
        out.update({k: total(float(v)) for k, v in self.faults.items()})
        if self.restart_s:
            out["fault/worker_restart_s"] = largest(max(self.restart_s))
        self.oversampled, self.faults, self.restart_s = 0, Counter(), []
        return out

    def published(self, handle: WeightHandle) -> None:
        """Keep `handle` for restarted workers: the newest version, and in deterministic mode every
        version a group in flight was dispatched for (each is generated with exactly its own)."""
        self.handles[handle.version] = handle
        oldest = min((w.min_version for _, w in self.in_flight.values()), default=handle.version)
        keep = oldest if self.cfg.rollout.deterministic else handle.version
        self.handles = {v: h for v, h in self.handles.items() if v >= keep}

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
        n, live = len(self.workers), self.live()
        if self.cfg.rollout.deterministic:  # share i keeps its seed, on another worker while i restarts
            works = [(i if i in live else live[i % len(live)],
                      Work(prompts[i::n], batch, min_version, mix_seed(self.cfg.seed, batch * n + i), fixed=True))
                     for i in range(n)]  # fmt: skip
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

    def live(self) -> list[int]:
        """The workers not being restarted (all of them when every one is: work then waits for them)."""
        return [i for i in range(len(self.workers)) if i not in self.down] or list(range(len(self.workers)))

    def _least_loaded(self, among: list[int]) -> int:
        return min(among, key=self._outstanding)

    def _outstanding(self, i: int) -> int:
        """Groups handed to worker i that it has still to generate."""
        return self.sent[i] - self.generated.get(i, 0)

    def _works_of(self, i: int) -> list[Work]:
        """The work in flight on worker i, each once (a deterministic share holds several groups)."""
        return list({id(work): work for w, work in self.in_flight.values() if w == i}.values())

    def _hand(self, i: int, work: Work) -> None:
        """Give `work` to worker i: now, or once its new process is in. Its groups are tracked each
        on its own (handed out again one by one), a deterministic share as a whole."""
        for p in work.prompts:
            self.in_flight[p.group_id] = (i, work if work.fixed else Work([p], work.batch_id, work.min_version))
        self.sent[i] += len(work.prompts)
        if i not in self.down:
            self.workers[i].submit.remote(work)

    def recover(self, i: int, restarts: int) -> None:
        """Worker i died under a call made when it had been restarted `restarts` times: restart it,
        unless that was done meanwhile (waiting for its serving loop to end, as it must)."""
        import ray

        if self.restarts[i] == restarts and i not in self.down:
            ray.wait([self.serving[i]], timeout=self.cfg.ray.stall_timeout_s)
        self.check_workers()

    def restarted_since(self, restarts: int) -> bool:
        """After a failed weight transfer begun when the workers had `restarts` restarts in all:
        whether a worker was restarted since (Ray is given 10 s to report a death first, so that a
        death is named as the cause)."""
        self.check_workers(wait_s=10.0)
        return sum(self.restarts) > restarts

    def check_workers(self, wait_s: float = 0.0) -> None:
        """Restart each worker whose serving loop ended (it died, or its engine raised), and bring in
        each restarted one whose new process is up; `wait_s`: how long to give Ray to notice a death."""
        import ray

        serving = [ref for i, ref in enumerate(self.serving) if i not in self.down]
        if wait_s and serving:
            ray.wait(serving, num_returns=1, timeout=wait_s)
        done, _ = ray.wait(serving, num_returns=len(serving), timeout=0) if serving else ([], [])
        for ref in done:
            i = self.serving.index(ref)
            died = False
            try:
                ray.get(ref, timeout=0)  # done
                why = "its serving loop ended"
            except ray.exceptions.RayError as e:
                why = actor_error_line(e, logs=str(self.cfg.run_dir / "run.log"))
                died = isinstance(e, ray.exceptions.RayActorError)
            self._restart(i, why, died)
        for i in list(self.down):
            self._bring_in(i)

    def _restart(self, i: int, why: str, died: bool) -> None:
        """Have Ray start worker i's process anew (it restarts a dead actor; one alive with a broken
        engine is killed for it) and hand its groups in flight to the other workers. Over the object
        store or disk the run goes on meanwhile, and `check_workers` brings the new process in once it
        is up; a broadcast group needs every member, so there the driver waits for it."""
        import ray

        self.restarts[i] += 1
        limit = self.cfg.rollout.max_worker_restarts
        if self.restarts[i] > limit:
            raise WorkerLost(f"rollout worker {i} failed and rollout.max_worker_restarts={limit} allows no more "
                             f"restarts; the last failure: {why}")  # fmt: skip
        broadcast = self.cfg.weight_sync.transport.type == "broadcast"
        if broadcast and self.cfg.rollout.deterministic:
            raise WorkerLost(f"rollout worker {i} failed ({why}); in deterministic mode its groups need the versions "
                             "they were dispatched for, which the broadcast transport keeps nowhere: use "
                             "object_store or disk to survive worker failures")  # fmt: skip
        log.warning("rollout worker %d failed (%s); restarting it (%d of %d)", i, why, self.restarts[i], limit)
        self.faults["fault/worker_restarts"] += 1
        t0, worker, old_pid = time.perf_counter(), self.workers[i], None
        if not died:  # alive with a broken engine: killed, for Ray to start it anew
            try:
                old_pid = wait_for(worker.pid.remote(), f"rollout worker {i}", self.cfg.ray.stall_timeout_s)
                ray.kill(worker, no_restart=False)
            except ray.exceptions.RayActorError:  # it died meanwhile, the same failure: Ray restarts it
                old_pid = None
        self.down[i] = _Restart(t0, old_pid, worker.pid.remote())
        self._hand_over(i)
        while broadcast and i in self.down:
            self._bring_in(i)
            if i in self.down:
                time.sleep(0.2)

    def await_restarts(self) -> None:
        """Block until every worker being restarted is in again (the run ends with all serving)."""
        while self.down:
            self.check_workers()
            time.sleep(0.2)

    def _hand_over(self, i: int) -> None:
        """Worker i's groups in flight, to the live workers (kept for i when there is none): the
        same prompts, group ids and batches (a deterministic share with its seed), less those that
        landed since the driver's last status of the buffer. A copy that still lands from the failed
        process is dropped by the buffer."""
        lost = self._drop_landed([gid for gid, (w, _) in self.in_flight.items() if w == i])
        self.sent[i] -= len(lost)
        for work in self._works_of(i):
            self._hand(self._least_loaded(self.live()), work)
        self.faults["fault/redispatched_groups"] += len(lost)
        log.warning("rollout worker %d: its %d groups in flight handed out again", i, len(lost))

    def _drop_landed(self, gids: list[int]) -> list[int]:
        """Of `gids`, about to be handed out again, those still in flight: the ones the buffer says
        landed meanwhile leave `in_flight`."""
        for gid in wait_for(self.buffer.redispatching.remote(gids), "buffer", self.cfg.ray.stall_timeout_s):
            self.in_flight.pop(gid)
        return [gid for gid in gids if gid in self.in_flight]

    def _bring_in(self, i: int) -> None:
        """Restarting worker i: once its new process answers (not the one killed, which a kill may
        not have reached yet; a call while Ray restarts it fails as unavailable), it rejoins. A new
        process that died instead (in its constructor, or as it answered; Ray restarts it again or
        has no restart left) is one more failure of worker i."""
        import ray

        r = self.down[i]
        if not ray.wait([r.probe], timeout=0)[0]:
            if time.perf_counter() - r.t0 > self.cfg.ray.stall_timeout_s:
                raise Stalled(f"rollout worker {i} was not restarted within "
                              f"ray.stall_timeout_s={self.cfg.ray.stall_timeout_s:g}s")  # fmt: skip
            return
        try:
            pid = ray.get(r.probe, timeout=0)  # done
        except ray.exceptions.ActorUnavailableError:
            pid = r.old_pid
        except ray.exceptions.RayActorError as e:
            self.down.pop(i)
            self._restart(i, actor_error_line(e, logs=str(self.cfg.run_dir / "run.log")), died=True)
            return
        if pid == r.old_pid:
            r.probe = self.workers[i].pid.remote()
            return
        self._rejoin(i)

    def _rejoin(self, i: int) -> None:
        """Worker i's new process joins: the weight sync and the newest weights (over broadcast a new
        group, see `reform`), its serving loop, and the work kept for it."""
        import ray

        worker, timeout = self.workers[i], self.cfg.ray.stall_timeout_s
        try:
            if self.cfg.weight_sync.transport.type == "broadcast":
                assert self.reform is not None
                self.reform()
            else:
                wait_for(worker.join_weight_sync.remote(None), f"weight sync of restarted rollout worker {i}", timeout)
                offers = [worker.offer_weights.remote(h) for _, h in sorted(self.handles.items())]
                wait_for(offers, f"weights for restarted rollout worker {i}", timeout)
        except ray.exceptions.RayActorError as e:  # the new process died too
            self.down.pop(i)
            self._restart(i, actor_error_line(e, logs=str(self.cfg.run_dir / "run.log")), died=True)
            return
        self.serving[i] = worker.serve.remote()
        for work in self._works_of(i):
            worker.submit.remote(work)
        self.restart_s.append(time.perf_counter() - self.down.pop(i).t0)
        log.warning("rollout worker %d is serving again after %.1fs", i, self.restart_s[-1])


@dataclass
class _Restart:
    """A worker being restarted: since when, the process killed (None: it died), and the call that
    answers once Ray has its new process up."""

    t0: float
    old_pid: int | None
    probe: Any


def join_weight_sync(trainer: Any, workers: list[Any], group: tuple[str, int, int] | None, timeout_s: float) -> None:
    """Both ends of the weight transport (`trainer`: rank 0, which publishes); a broadcast group forms
    only once all members call in."""
    calls = [trainer.join_weight_sync.remote(group)] + [w.join_weight_sync.remote(group) for w in workers]
    wait_for(calls, "weight-sync setup", timeout_s)


class WorkerLost(RunError):
    """A rollout worker failed past `rollout.max_worker_restarts` (or, in deterministic mode over
    broadcast, at all)."""


class EvalTracker:
    """Held-out evaluations in flight on a worker: requested without waiting, logged when they end."""

    def __init__(self, dispatch: Dispatcher, prompts: list[Prompt], timeout_s: float) -> None:
        self.dispatch = dispatch
        self.prompts = prompts
        self.timeout_s = timeout_s
        self.pending: dict[Any, tuple[int, int, int]] = {}
        """Evaluations in flight: their refs, the version each asked for, the worker and its restarts then."""

    def request(self, min_version: int) -> None:
        """An evaluation with weights >= `min_version`, on the first worker not being restarted."""
        if self.prompts:
            i = self.dispatch.live()[0]
            ref = self.dispatch.workers[i].evaluate.remote(self.prompts, min_version)
            self.pending[ref] = (min_version, i, self.dispatch.restarts[i])

    def collect(self, wait: bool) -> list[Metrics]:
        """The finished evaluations' metrics, oldest version first (every one still pending when
        `wait`). Two can end together when one outlasts the steps between evaluations. One lost with
        its worker (which the dispatcher restarts) is asked again."""
        import ray

        done: list[Metrics] = []
        deadline = time.monotonic() + self.timeout_s
        while self.pending:
            left = max(deadline - time.monotonic(), 0.0) if wait else 0.0
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=min(left, 1.0))
            if wait and not ready:
                if not left:
                    raise Stalled(f"held-out evaluation did not answer within ray.stall_timeout_s={self.timeout_s:g}s")
                # Asked of a worker being restarted, an evaluation waits for its serving loop, which
                # starts once the dispatcher brings the new process in.
                self.dispatch.check_workers()
                continue
            for ref in ready:
                version, i, restarts = self.pending.pop(ref)
                try:
                    done.append(ray.get(ref, timeout=0))  # done
                except ray.exceptions.RayActorError:
                    self.dispatch.recover(i, restarts)
                    self.request(version)
            if not wait:
                break
        return sorted(done, key=lambda m: values(m)["eval/version"])


class SyncTracker:
    """The workers' weight offers in flight: collected without blocking, so a failed sync surfaces
    as an error at the next step instead of being lost, and finished ones give sync throughput."""

    def __init__(self, dispatch: Dispatcher) -> None:
        self.dispatch = dispatch
        self.pending: dict[Any, int] = {}
        """Offers in flight, with the workers' total restarts when each was made."""

    def add(self, refs: list[Any]) -> None:
        self.pending.update(dict.fromkeys(refs, sum(self.dispatch.restarts)))

    def collect(self, timeout_s: float) -> Metrics:
        import ray

        if not self.pending:
            return {}
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout_s)
        stats: list[SyncStats] = []
        for ref in done:
            restarts = self.pending.pop(ref)
            try:
                stats.append(ray.get(ref, timeout=0))  # done; raises the error of a failed offer
            except ray.exceptions.RayActorError:
                pass  # the worker died: its restart gives the new process the newest weights
            except ray.exceptions.RayTaskError:  # a broadcast that a dead member failed, re-formed since
                broadcast = self.dispatch.cfg.weight_sync.transport.type == "broadcast"
                if not (broadcast and self.dispatch.restarted_since(restarts)):
                    raise
        stats = [s for s in stats if s is not None]  # abandoned with a broadcast group a restart re-formed
        if not stats:
            return {}
        seconds = sum(s.seconds for s in stats)
        return {
            "async/sync_bytes_per_s": mean(sum(s.nbytes for s in stats) / max(seconds, 1e-9)),
            "async/sync_time_s": mean(seconds / len(stats), float(len(stats))),
        }
