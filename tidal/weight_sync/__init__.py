"""Weight sync from the trainer to the rollout workers: three transports behind one small interface.

The trainer's `WeightPublisher.publish(weights, version)` takes a snapshot of the policy without
waiting for any worker and returns a `WeightHandle`; the driver passes the handle to each worker
through Ray, and the worker's `WeightReceiver.receive_buckets(handle)` (in a control thread, possibly
while it generates) yields state dicts bit-identical to the published ones. `weights` is a state dict or
a stream of partial state dicts (`buckets`), consumed one bucket at a time: the trainer builds no
whole state dict of the model on the way. Each transport keeps one copy of the snapshot where the
workers read it, so that the trainer trains on meanwhile: in the object store, in host-memory
staging buffers (broadcast), or in files (disk).

- `object_store`: each bucket is `ray.put` into the Ray object store; works across nodes.
- `broadcast`: a torch.distributed group of its own (trainer rank 0, workers 1..N) broadcasts the
  snapshot in dtype-homogeneous flat buckets; the handle carries only the bucket plan. Every worker
  must receive every published version, in order: a broadcast needs all ranks.
- `disk`: one directory of safetensors files (a file per bucket) per version, on a disk the workers
  share, for engines that reload weights from disk.

Each transport is a module of this package (`object_store`, `broadcast`, `disk`), `common` what they
share; this module picks one by the config (`make_publisher`, `make_receiver`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tidal.config import WeightSyncConfig
from tidal.weight_sync.broadcast import BroadcastPublisher, BroadcastReceiver, SyncAbandoned, sync_group_address
from tidal.weight_sync.common import (
    GroupAddress,
    WeightHandle,
    WeightPublisher,
    WeightReceiver,
    Weights,
    as_buckets,
    buckets,
    state_nbytes,
)
from tidal.weight_sync.disk import DiskPublisher, DiskReceiver, unshared
from tidal.weight_sync.object_store import ObjectStorePublisher, ObjectStoreReceiver

__all__ = [
    "BroadcastPublisher",
    "BroadcastReceiver",
    "DiskPublisher",
    "DiskReceiver",
    "GroupAddress",
    "ObjectStorePublisher",
    "ObjectStoreReceiver",
    "PUBLISHERS",
    "RECEIVERS",
    "SyncAbandoned",
    "WeightHandle",
    "WeightPublisher",
    "WeightReceiver",
    "Weights",
    "as_buckets",
    "buckets",
    "make_publisher",
    "make_receiver",
    "state_nbytes",
    "sync_group_address",
    "unshared",
]

PUBLISHERS: dict[str, Callable[[Any, Path, GroupAddress | None], WeightPublisher]] = {
    "object_store": ObjectStorePublisher,
    "broadcast": BroadcastPublisher,
    "disk": DiskPublisher,
}
"""Transport type -> publisher class, called as cls(transport config, weights_dir, group)."""
RECEIVERS: dict[str, Callable[[Any, GroupAddress | None, int], WeightReceiver]] = {
    "object_store": ObjectStoreReceiver,
    "broadcast": BroadcastReceiver,
    "disk": DiskReceiver,
}
"""Transport type -> receiver class, called as cls(transport config, group, rank)."""


def make_publisher(cfg: WeightSyncConfig, weights_dir: Path, group: GroupAddress | None = None) -> WeightPublisher:
    """The trainer's publisher for `cfg.transport`; for broadcast this blocks until every worker's
    `make_receiver` joined the group (`group` from `sync_group_address()` plus the world size)."""
    return PUBLISHERS[cfg.transport.type](cfg.transport, weights_dir, group)


def make_receiver(cfg: WeightSyncConfig, group: GroupAddress | None = None, rank: int = 0) -> WeightReceiver:
    """A worker's receiver for `cfg.transport`; `group` and `rank` (1..N) only matter for broadcast."""
    return RECEIVERS[cfg.transport.type](cfg.transport, group, rank)
