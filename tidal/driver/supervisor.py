"""The driver's care of the rollout workers: their health, restarts, and rejoining.

A worker that dies is restarted (Ray's actor restarts, `rollout.max_worker_restarts`): the supervisor
gives the new process the weight sync and the newest weights, starts its serving loop again, and has
the dispatcher hand it the groups its predecessor had not landed in the buffer, as they were (same
prompts, group ids, batches; a deterministic share with its seed), less those the buffer says landed
meanwhile. The buffer keeps the first copy of a group handed out twice, so nothing is lost or trained
twice. A failure counts against `rollout.max_worker_restarts` wherever it is noticed: the serving
loop ending, the restart's check of the process, the new process dying before it answers or while
it rejoins.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tidal.config import RunConfig
from tidal.driver.dispatch import Dispatcher
from tidal.runtime import RunError, Stalled, actor_error_line, wait_for
from tidal.telemetry.metrics import Metrics, largest, total
from tidal.weight_sync import WeightHandle

log = logging.getLogger(__name__)

REPROBE_S = 0.05
"""Shortest time between two probes of a worker being restarted."""


class WorkerLost(RunError):
    """A rollout worker failed past `rollout.max_worker_restarts` (or, in deterministic mode over
    broadcast, at all)."""


class Supervisor:
    """Watches the workers' serving loops; restarts a worker that failed and brings its new process in
    (see the module doc). The dispatcher asks it which workers are serving."""

    def __init__(self, cfg: RunConfig, dispatch: Dispatcher, reform: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.dispatch = dispatch
        dispatch.health = self
        self.workers = dispatch.workers
        self.serving: list[Any] = []
        """The workers' `serve` calls (`start`): one that ends before the run does carries the worker's error."""
        self.reform = reform
        """Re-forms the broadcast group and sends the weights again (a restart over broadcast)."""
        self.handles: dict[int, WeightHandle] = {}
        """Published versions a restarted worker may need, by version (see `published`)."""
        self.restarts = [0] * len(self.workers)
        self.faults: Counter[str] = Counter()
        """`fault/` counts since the last `metrics()`."""
        self.restart_s: list[float] = []
        self.down: dict[int, _Restart] = {}
        """Workers being restarted: no work is handed to them until their new process is in."""

    def start(self) -> None:
        """Start every worker's serving loop."""
        self.serving = [w.serve.remote() for w in self.workers]

    def live(self) -> list[int]:
        """The workers not being restarted (all of them when every one is: work then waits for them)."""
        return [i for i in range(len(self.workers)) if i not in self.down] or list(range(len(self.workers)))

    def is_down(self, i: int) -> bool:
        return i in self.down

    def metrics(self) -> Metrics:
        out = {k: total(float(v)) for k, v in self.faults.items()}
        if self.restart_s:
            out["fault/worker_restart_s"] = largest(max(self.restart_s))
        self.faults, self.restart_s = Counter(), []
        return out

    def published(self, handle: WeightHandle) -> None:
        """Keep `handle` for restarted workers: the newest version, and in deterministic mode every
        version a group in flight was dispatched for (each is generated with exactly its own)."""
        self.handles[handle.version] = handle
        keep = self.dispatch.oldest_min_version(handle.version) if self.cfg.rollout.deterministic else handle.version
        self.handles = {v: h for v, h in self.handles.items() if v >= keep}

    def settle(self) -> None:
        """Stop every worker (the live ones after their current generate call), and the groups that
        landed are accounted: those still in flight are the ones to hand out again."""
        import ray

        for worker in self.workers:
            worker.stop.remote()
        ray.wait(self.serving, num_returns=len(self.serving), timeout=self.cfg.ray.stall_timeout_s)
        self.dispatch.settle()

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
                why = self._failure_line(e)
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
            raise WorkerLost(
                f"rollout worker {i} failed and rollout.max_worker_restarts={limit} allows no more "
                f"restarts; the last failure: {why}"
            )
        broadcast = self.cfg.weight_sync.transport.type == "broadcast"
        if broadcast and self.cfg.rollout.deterministic:
            raise WorkerLost(
                f"rollout worker {i} failed ({why}); in deterministic mode its groups need the versions "
                "they were dispatched for, which the broadcast transport keeps nowhere: use "
                "object_store or disk to survive worker failures"
            )
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
                self._await_probes()

    def _failure_line(self, e: Exception) -> str:
        """One line for a worker's failure, pointing at the run's log for its output."""
        return actor_error_line(e, logs=str(self.cfg.run_dir / "run.log"))

    def await_restarts(self) -> None:
        """Block until every worker being restarted is in again (the run ends with all serving)."""
        while self.down:
            self.check_workers()
            if self.down:
                self._await_probes()

    def _await_probes(self, timeout_s: float = 1.0) -> None:
        """Block until the probe of a worker being restarted answers, or `timeout_s`. One that the old
        process answers (a kill takes a moment to land) is asked again, and may answer at once: the
        wait lasts at least `REPROBE_S`, a bound on how often a restarting worker is asked."""
        import ray

        t0 = time.monotonic()
        ray.wait([r.probe for r in self.down.values()], num_returns=1, timeout=timeout_s)
        time.sleep(max(0.0, REPROBE_S - (time.monotonic() - t0)))

    def _hand_over(self, i: int) -> None:
        """Worker i's groups in flight, to the live workers (`Dispatcher.hand_over`)."""
        lost = self.dispatch.hand_over(i)
        self.faults["fault/redispatched_groups"] += lost
        log.warning("rollout worker %d: its %d groups in flight handed out again", i, lost)

    def _bring_in(self, i: int) -> None:
        """Restarting worker i: once its new process answers (not the one killed, which a kill may
        not have reached yet; a call while Ray restarts it fails as unavailable), it rejoins. A new
        process that died instead (in its constructor, or as it answered; Ray restarts it again or
        has no restart left) is one more failure of worker i."""
        import ray

        r = self.down[i]
        if not ray.wait([r.probe], timeout=0)[0]:
            if time.perf_counter() - r.t0 > self.cfg.ray.stall_timeout_s:
                raise Stalled(
                    f"rollout worker {i} was not restarted within ray.stall_timeout_s={self.cfg.ray.stall_timeout_s:g}s"
                )
            return
        try:
            pid = ray.get(r.probe, timeout=0)  # done
        except ray.exceptions.ActorUnavailableError:
            pid = r.old_pid
        except ray.exceptions.RayActorError as e:
            self.down.pop(i)
            self._restart(i, self._failure_line(e), died=True)
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
            self._restart(i, self._failure_line(e), died=True)
            return
        self.serving[i] = worker.serve.remote()
        for work in self.dispatch.works_of(i):
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
