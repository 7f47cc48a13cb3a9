"""The driver's side of weight publishing: the trainer publishes, the driver offers the handle to
every worker (without waiting: `SyncTracker`) and keeps it for a worker restarted later; over the
broadcast transport a restart re-forms the group and sends the weights again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tidal.config import RunConfig
from tidal.driver.supervisor import Supervisor, join_weight_sync
from tidal.driver.trackers import SyncTracker
from tidal.trainer.group import TrainerGroup


class Publishing:
    """Publishes the trainer's weights to the workers; `published`: the newest version offered."""

    def __init__(self, cfg: RunConfig, trainer: TrainerGroup, workers: list[Any], get: Callable[..., Any]) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.workers = workers
        self.get = get
        self.broadcast = cfg.weight_sync.transport.type == "broadcast"
        self.published = 0
        self.supervisor: Supervisor | None = None
        self.offers: SyncTracker | None = None

    def attach(self, supervisor: Supervisor) -> SyncTracker:
        """Publish to the workers `supervisor` watches; the tracker of the offers made."""
        self.supervisor = supervisor
        self.offers = SyncTracker(supervisor, broadcast=self.broadcast)
        return self.offers

    def publish(self) -> dict[str, Any]:
        """The trainer's weights to every worker; the publish's metrics."""
        import ray

        assert self.supervisor is not None and self.offers is not None
        restarts = sum(self.supervisor.restarts)
        try:
            handle, metrics = self.get(self.trainer.call("publish"), "weight publish")[0]
        except ray.exceptions.RayTaskError:
            # A dead worker fails a broadcast: then it is the cause to name, and its restart re-formed
            # the group and sent these weights.
            if self.supervisor.restarted_since(restarts) and self.broadcast:
                return {}
            raise
        self.offers.add([w.offer_weights.remote(handle) for w in self.workers])
        self.supervisor.published(handle)
        self.published = handle.version
        return metrics

    def reform(self) -> None:
        """A worker was restarted under the broadcast transport: every member leaves the old group (a
        receive waiting for the dead member ends), all join a new one, and the current weights go to
        every worker again (the new process has none; the others may have missed the last send)."""
        assert self.supervisor is not None
        self.get([w.leave_weight_sync.remote() for w in self.workers], "leaving the weight-sync group")
        group = self.get(self.trainer.rank0.reform_weight_sync.remote(len(self.workers)), "weight-sync group")
        join_weight_sync(self.trainer.rank0, self.workers, group, self.cfg.ray.stall_timeout_s)
        handle, _ = self.get(self.trainer.call("publish"), "weight publish")[0]
        self.get([w.offer_weights.remote(handle) for w in self.workers], "weights over the re-formed group")
        self.supervisor.published(handle)
        self.published = handle.version
