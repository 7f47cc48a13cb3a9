"""What every transport shares: the handle a publish returns, the publisher and receiver interfaces,
and the cutting of a state dict into buckets."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor] | Iterable[dict[str, torch.Tensor]]
"""What `publish` takes: a state dict, or a stream of partial state dicts (buckets) to consume once."""
GroupAddress = tuple[str, int, int]
"""(address, port, world_size) of a broadcast group: the trainer's TCPStore and 1 + workers."""


@dataclass
class WeightHandle:
    """What crosses from the trainer to the workers through Ray: a published version and how to fetch it."""

    version: int
    nbytes: int
    """Bytes of the state dict."""
    transport: str
    """The transport that published it: object_store, broadcast or disk."""
    payload: Any
    """Per transport: `[ObjectRef]`, a `BroadcastPlan`, a `DiskFile`."""


class WeightPublisher(Protocol):
    """Trainer side: publishes snapshots; `publish` returns without waiting for any worker."""

    def publish(self, weights: Weights, version: int) -> WeightHandle: ...

    def close(self) -> None: ...


class WeightReceiver(Protocol):
    """Worker side: turns a handle into a state dict bit-identical to the published one."""

    def receive_buckets(self, handle: WeightHandle) -> Iterator[dict[str, torch.Tensor]]:
        """The snapshot as partial state dicts, one transport piece (bucket, object, file) at a
        time; must be consumed to the end (a broadcast holds the group until then)."""
        ...

    def close(self) -> None: ...


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """(name, tensor) pairs grouped, in order, into partial state dicts of at most `bucket_bytes`; a
    tensor larger than that is a bucket of its own. Lazy: one bucket is held at a time."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += nbytes
    if bucket:
        yield bucket


def as_buckets(weights: Weights) -> Iterable[dict[str, torch.Tensor]]:
    """A state dict as a stream of one bucket; a stream as it is."""
    return [weights] if isinstance(weights, dict) else weights


def _check_transport(handle: WeightHandle, transport: str) -> None:
    if handle.transport != transport:
        raise ValueError(
            f"a {transport} weight receiver got a {handle.transport} handle (v{handle.version}); "
            "the trainer and the workers must use the same weight_sync.transport"
        )


def _log_publish(handle: WeightHandle, t0: float) -> None:
    log.debug(
        "weight sync %s: published v%d (%.1f MB) in %.3fs",
        handle.transport,
        handle.version,
        handle.nbytes / 1e6,
        time.perf_counter() - t0,
    )
