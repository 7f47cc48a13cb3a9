"""What the driver waits on beside the steps' groups: held-out evaluations and weight offers, each
in flight on a worker the supervisor may restart meanwhile."""

from __future__ import annotations

import time
from typing import Any

from tidal.driver.supervisor import Supervisor
from tidal.runtime import Stalled
from tidal.telemetry.metrics import Metrics, mean, values
from tidal.types import Prompt, SyncStats


class EvalTracker:
    """Held-out evaluations in flight on a worker: requested without waiting, logged when they end."""

    def __init__(self, workers: Supervisor, prompts: list[Prompt], timeout_s: float) -> None:
        self.workers = workers
        self.prompts = prompts
        self.timeout_s = timeout_s
        self.pending: dict[Any, tuple[int, int, int]] = {}
        """Evaluations in flight: their refs, the version each asked for, the worker and its restarts then."""

    def request(self, min_version: int) -> None:
        """An evaluation with weights >= `min_version`, on the first worker not being restarted."""
        if self.prompts:
            i = self.workers.live()[0]
            ref = self.workers.workers[i].evaluate.remote(self.prompts, min_version)
            self.pending[ref] = (min_version, i, self.workers.restarts[i])

    def collect(self, wait: bool) -> list[Metrics]:
        """The finished evaluations' metrics, oldest version first (every one still pending when
        `wait`). Two can end together when one outlasts the steps between evaluations. One lost with
        its worker (which the supervisor restarts) is asked again."""
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
                # starts once the supervisor brings the new process in.
                self.workers.check_workers()
                continue
            for ref in ready:
                version, i, restarts = self.pending.pop(ref)
                try:
                    done.append(ray.get(ref, timeout=0))  # done
                except ray.exceptions.RayActorError:
                    self.workers.recover(i, restarts)
                    self.request(version)
            if not wait:
                break
        return sorted(done, key=lambda m: values(m)["eval/version"])


class SyncTracker:
    """The workers' weight offers in flight: collected without blocking, so a failed sync surfaces
    as an error at the next step instead of being lost, and finished ones give sync throughput."""

    def __init__(self, workers: Supervisor, broadcast: bool) -> None:
        self.workers = workers
        self.broadcast = broadcast
        self.pending: dict[Any, int] = {}
        """Offers in flight, with the workers' total restarts when each was made."""

    def add(self, refs: list[Any]) -> None:
        self.pending.update(dict.fromkeys(refs, sum(self.workers.restarts)))

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
                if not (self.broadcast and self.workers.restarted_since(restarts)):
                    raise
        stats = [s for s in stats if s is not None]  # abandoned with a broadcast group a restart re-formed
        if not stats:
            return {}
        seconds = sum(s.seconds for s in stats)
        return {
            "async/sync_bytes_per_s": mean(sum(s.nbytes for s in stats) / max(seconds, 1e-9)),
            "async/sync_time_s": mean(seconds / len(stats), float(len(stats))),
        }
