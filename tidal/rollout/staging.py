"""A rollout worker's weights between two threads: snapshots offered on the control thread are
received (bucket by bucket, while a generation may be running) and staged in CPU memory (a GPU holds
one received bucket at a time, never a second copy of the model); the generation thread loads the
newest staged one between generate calls, or at a chunk boundary inside one with
`rollout.interruptible`.

With `rollout.deterministic` every staged version a queued batch may still need is kept, and a batch
is generated with exactly the version it was dispatched for (`wait_for`), so a run does not depend
on timing; otherwise only the newest is kept, and a staged snapshot is dropped as soon as a newer
one starts to arrive: beside the engine's weights a worker holds at most one snapshot in host
memory, staged or being received. `most_held` counts the most it held at once (the
`async/worker_snapshots_held` metric).
"""

from __future__ import annotations

import threading
import time

import torch

from tidal.config import WeightSyncConfig
from tidal.rollout.engines.base import Engine
from tidal.types import SyncStats
from tidal.weight_sync import BroadcastReceiver, SyncAbandoned, WeightHandle, WeightReceiver, make_receiver

Buckets = list[dict[str, torch.Tensor]]


class WeightStage:
    """Offer, check, stage and apply a worker's weight snapshots (see the module doc)."""

    def __init__(self, engine: Engine, sync: WeightSyncConfig, index: int, exact: bool, timeout_s: float) -> None:
        self.engine = engine
        self.sync = sync
        self.index = index
        self.exact = exact
        self.timeout_s = timeout_s
        self.receiver: WeightReceiver | None = None
        self.staged: dict[int, Buckets] = {}
        """Snapshots received and not loaded yet, by version: the newest only, or with `exact` every
        one a queued batch may still need."""
        self.pinned = 0  # exact: the version the work being generated was dispatched for
        self.cv = threading.Condition()
        self.most_held = 0
        """The most snapshots held at once, staged or being received, since `take_most_held`."""

    # ------------------------------------------------------------------------- control thread

    def join(self, group: tuple[str, int, int] | None) -> None:
        """Build the receiving end (for `broadcast`: join the trainer's group as rank index + 1)."""
        self.receiver = make_receiver(self.sync, group, rank=self.index + 1)

    def leave(self) -> None:
        """Give up a broadcast group for a new one: a receive in progress ends at once."""
        if isinstance(self.receiver, BroadcastReceiver):
            self.receiver.abandon()

    def offer(self, handle: WeightHandle) -> SyncStats | None:
        """Receive a published snapshot and stage it; None when its broadcast was abandoned (the group
        is re-formed, and the snapshot sent again)."""
        t0 = time.perf_counter()
        if self.receiver is None:
            self.receiver = make_receiver(self.sync)
        with self.cv:
            if not self.exact:  # the newest wins: an older staged snapshot would never be loaded
                self.staged = {v: b for v, b in self.staged.items() if v > handle.version}
            self.most_held = max(self.most_held, len(self.staged) + 1)
        try:
            received = self.receiver.receive_buckets(handle)
            buckets = [{name: t.cpu() for name, t in bucket.items()} for bucket in received]
        except SyncAbandoned:
            return None
        seconds = time.perf_counter() - t0
        self.check_fits(buckets, handle.version)
        with self.cv:
            if self.exact:
                self.staged[handle.version] = buckets
            elif handle.version > max(self.staged, default=-1):
                self.staged = {handle.version: buckets}
            self.cv.notify_all()
        return SyncStats(handle.version, handle.nbytes, seconds)

    def take_most_held(self) -> int:
        """The most snapshots held at once since the last call (at least those staged now)."""
        with self.cv:
            most, self.most_held = max(self.most_held, len(self.staged)), len(self.staged)
            return most

    def check_fits(self, buckets: Buckets, version: int) -> None:
        """Checked before staging: a snapshot that does not fit must leave the old weights intact."""
        names, got = self.engine.weight_names(), {name for bucket in buckets for name in bucket}
        missing, unexpected = sorted(names - got), sorted(got - names)
        if missing or unexpected:
            raise RuntimeError(
                f"weight snapshot v{version} does not fit the rollout model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )

    # ---------------------------------------------------------------------- generation thread

    def pending(self) -> bool:
        """Whether a snapshot is staged and not loaded yet."""
        return bool(self.staged)

    def wait_for(self, min_version: int) -> float:
        """Block until weights of version >= `min_version` (exact: exactly `min_version`) are held or
        staged, and apply them; seconds waited."""
        t0 = time.perf_counter()
        held = self.engine.version
        if self.exact and held > min_version:
            raise RuntimeError(
                f"rollout worker {self.index} holds v{held}, past v{min_version} that its "
                "next batch was dispatched for (rollout.deterministic)"
            )

        def ready() -> bool:
            if self.exact:
                return self.engine.version == min_version or min_version in self.staged
            return max([*self.staged, self.engine.version]) >= min_version

        with self.cv:
            if not self.cv.wait_for(ready, timeout=self.timeout_s):
                raise TimeoutError(
                    f"rollout worker {self.index} waited {self.timeout_s:g}s (ray.stall_timeout_s) for weights "
                    f"v{min_version} but holds v{self.engine.version}; did a weight sync fail?"
                )
            self.pinned = min_version
        self.apply()
        return time.perf_counter() - t0

    def apply(self) -> None:
        """Load the newest staged snapshot newer than the weights held (exact: none past the version
        the current work was dispatched for) and drop older ones."""
        with self.cv:
            usable = [v for v in self.staged if v > self.engine.version and (not self.exact or v <= self.pinned)]
            if not usable:
                return
            version = max(usable)
            buckets = self.staged[version]
            self.staged = {v: b for v, b in self.staged.items() if v > version}
        self.engine.load_weights(buckets, version)

    def load_now(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Load a whole state dict now (in-process use), dropping staged snapshots it supersedes."""
        self.check_fits([state], version)
        with self.cv:
            self.staged = {v: b for v, b in self.staged.items() if v > version}
        self.engine.load_weights([state], version)
