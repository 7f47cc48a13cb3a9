"""`broadcast`: a torch.distributed group of its own (trainer rank 0, workers 1..N) broadcasts the
snapshot in dtype-homogeneous flat buckets; the handle carries only the bucket plan. Every worker
must receive every published version, in order: a broadcast needs all ranks.

Setup is two-phase, because building the group blocks until every rank joins: the trainer calls
`sync_group_address()`, then the trainer's `make_publisher` and every worker's `make_receiver` run
concurrently with `group=(address, port, world_size)`.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tidal.config import BroadcastSync
from tidal.weight_sync.common import (
    GroupAddress,
    WeightHandle,
    Weights,
    _check_transport,
    _log_publish,
    as_buckets,
    state_nbytes,
)


@dataclass(frozen=True)
class Slot:
    """One tensor inside a bucket; `offset` counts elements of the bucket's dtype."""

    name: str
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class Bucket:
    dtype: torch.dtype
    numel: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class BroadcastPlan:
    """The payload of a broadcast handle: the buckets in send order."""

    buckets: tuple[Bucket, ...]


def plan_buckets(state: dict[str, torch.Tensor]) -> list[Bucket]:
    """One bucket per dtype of a (partial) state dict, its tensors in state-dict order."""
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in state.items():
        by_dtype.setdefault(t.dtype, []).append((name, t))
    out = []
    for dtype, items in by_dtype.items():
        slots, numel = [], 0
        for name, t in items:
            slots.append(Slot(name, tuple(t.shape), numel))
            numel += t.numel()
        out.append(Bucket(dtype, numel, tuple(slots)))
    return out


def sync_group_address() -> tuple[str, int]:
    """Address and a free port for a broadcast group's TCPStore; call it on the trainer, which hosts
    the store. The port is free now; another process could take it before the store binds it."""
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    with socket.socket() as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


def _resolve_backend(cfg: BroadcastSync) -> str:
    backend = cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not (torch.cuda.is_available() and hasattr(torch.distributed, "ProcessGroupNCCL")):
        raise RuntimeError(
            "weight_sync.transport.backend=nccl needs CUDA and a torch built with NCCL; set backend: gloo"
        )
    return backend


def _join_group(cfg: BroadcastSync, group: GroupAddress | None, rank: int) -> tuple[Any, Any, torch.device]:
    """Build this rank's side of the weight-sync group: (store, process group, device of buffers).

    Not the default process group: the trainer already has DeepSpeed's. Gloo's constructor blocks
    (with the GIL released) until all ranks joined or the timeout passed; NCCL's connects lazily.
    """
    if group is None:
        raise ValueError("the broadcast weight sync needs group=(address, port, world_size) from sync_group_address()")
    address, port, world_size = group
    if not 0 <= rank < world_size:
        raise ValueError(f"broadcast weight sync: rank {rank} is outside a group of {world_size}")
    backend = _resolve_backend(cfg)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    dist = torch.distributed
    try:
        store = dist.TCPStore(address, port, world_size, is_master=rank == 0, wait_for_workers=False, timeout=timeout)
        if backend == "gloo":
            return store, dist.ProcessGroupGloo(store, rank, world_size, timeout), torch.device("cpu")
    except RuntimeError as e:
        raise RuntimeError(
            f"broadcast weight sync: rank {rank} of {world_size} could not join the {backend} group "
            f"at {address}:{port} within timeout_s={cfg.timeout_s:g}: {e}"
        ) from e
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    device = torch.device("cuda", torch.cuda.current_device())
    return store, dist.ProcessGroupNCCL(store, rank, world_size, options), device


class SyncAbandoned(Exception):
    """A broadcast given up because its group is being re-formed (a member died)."""


def _abandoned_error(what: str) -> SyncAbandoned:
    return SyncAbandoned(f"broadcast weight sync: {what} abandoned, the group is being re-formed")


def _broadcast(pg: Any, flat: torch.Tensor, timeout_s: float, what: str, abandoned: threading.Event) -> None:
    """Broadcast `flat` from rank 0, bit for bit: sent as bytes, so any dtype goes through.

    Polled rather than waited on, so that `abandoned` (set from another thread) ends a broadcast
    that a dead member keeps from completing: every other member would otherwise wait it out.
    """
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    deadline = time.monotonic() + timeout_s
    if abandoned.is_set():
        raise _abandoned_error(what)
    try:
        work = pg.broadcast([flat.view(torch.uint8)], opts)
        while not work.is_completed():
            if abandoned.is_set():
                raise _abandoned_error(what)
            if time.monotonic() > deadline:
                raise RuntimeError("timed out")
            time.sleep(0.001)
        work.wait()  # raises the collective's error
        if flat.is_cuda:  # NCCL's wait only orders the current stream; the caller needs the bytes
            torch.cuda.current_stream(flat.device).synchronize()
    except RuntimeError as e:
        # Abandoning aborts the group, which can complete the work with an error before the loop
        # sees the flag; either way the collective ended because the group was given up.
        if abandoned.is_set():
            raise _abandoned_error(what) from e
        raise RuntimeError(
            f"broadcast weight sync: {what} did not complete within timeout_s={timeout_s:g} "
            f"(every worker must receive every published version): {e}"
        ) from e


def _abandon(abandoned: threading.Event, pg: Any) -> None:
    """Give up the group: a broadcast in progress raises SyncAbandoned; NCCL's kernels are aborted."""
    abandoned.set()
    if pg is not None:
        with contextlib.suppress(RuntimeError):
            pg.abort()


class BroadcastPublisher:
    """Rank 0: copies the snapshot, bucket by bucket as it streams in, into staged flat buffers, then
    a sender thread broadcasts them.

    One send is in flight at a time: `publish` first waits for the previous send. A failed send
    leaves the group unusable (the ranks no longer agree on the sequence of collectives), so every
    later `publish` and `close` raises its error. The staged buffers (one copy of the weights in the
    dtype they are published in) are what lets the trainer go on training while the workers
    receive; they live in host memory (pinned with NCCL) and are kept from one publish to the next.
    With NCCL the sender moves them through one bucket-sized GPU buffer: the GPU never holds more
    than a bucket of the snapshot.
    """

    def __init__(self, cfg: BroadcastSync, weights_dir: Path, group: GroupAddress | None) -> None:
        self.cfg = cfg
        self._store, self._pg, self._device = _join_group(cfg, group, rank=0)
        self._abandoned = threading.Event()
        self._sender: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staged: list[torch.Tensor] = []

    def publish(self, weights: Weights, version: int) -> WeightHandle:
        t0 = time.perf_counter()
        self._wait_sender()
        planned: list[Bucket] = []
        nbytes = 0
        with torch.no_grad():
            for chunk in as_buckets(weights):
                for bucket in plan_buckets(chunk):
                    flat = self._stage(len(planned), bucket)
                    for slot in bucket.slots:
                        t = chunk[slot.name]
                        flat[slot.offset : slot.offset + t.numel()].view(slot.shape).copy_(t)
                    planned.append(bucket)
                nbytes += state_nbytes(chunk)
        del self._staged[len(planned) :]
        # A daemon thread: a send stuck on a dead worker must not keep the trainer's process alive.
        self._sender = threading.Thread(target=self._send, args=(version,), name=f"weight-sync-v{version}", daemon=True)
        self._sender.start()
        handle = WeightHandle(version, nbytes, "broadcast", BroadcastPlan(tuple(planned)))
        _log_publish(handle, t0)
        return handle

    def _stage(self, i: int, bucket: Bucket) -> torch.Tensor:
        """Staged buffer i, reused when the previous publish had one of the same dtype and size."""
        if i < len(self._staged) and (self._staged[i].dtype, self._staged[i].numel()) == (bucket.dtype, bucket.numel):
            return self._staged[i]
        flat = torch.empty(bucket.numel, dtype=bucket.dtype, pin_memory=self._device.type == "cuda")
        if i < len(self._staged):
            self._staged[i] = flat
        else:
            self._staged.append(flat)
        return flat

    def _send(self, version: int) -> None:
        try:
            if self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            n = len(self._staged)
            # A header first, so that a worker that skipped a version fails instead of mislabelling one.
            header = torch.tensor([version, n], dtype=torch.int64, device=self._device)
            _broadcast(self._pg, header, self.cfg.timeout_s, f"sending v{version} (header)", self._abandoned)
            on_device = None
            if self._device.type == "cuda":
                largest = max((flat.numel() * flat.element_size() for flat in self._staged), default=0)
                on_device = torch.empty(largest, dtype=torch.uint8, device=self._device)
            for i, flat in enumerate(self._staged):
                if flat.numel():
                    data = flat.view(torch.uint8)
                    if on_device is not None:
                        data = on_device[: data.numel()].copy_(data)
                    _broadcast(
                        self._pg, data, self.cfg.timeout_s, f"sending v{version} (bucket {i + 1}/{n})", self._abandoned
                    )
        except BaseException as e:  # re-raised in the trainer's thread by the next publish or close
            self._error = e

    def _wait_sender(self) -> None:
        if self._sender is not None:
            # Each of the sender's waits is bounded by timeout_s, so this join ends.
            self._sender.join()
            self._sender = None
        if self._error is not None:
            raise RuntimeError(f"{self._error}; the weight-sync group is unusable after a failed send") from self._error

    def close(self) -> None:
        try:
            self._wait_sender()
        finally:
            self._pg = self._store = None
            self._staged = []

    def abandon(self) -> None:
        """Leave the group for a new one (a worker died): the send in progress ends, its error dropped."""
        _abandon(self._abandoned, self._pg)
        if self._sender is not None:
            self._sender.join()
        self._sender, self._error = None, None
        self._pg = self._store = None


class BroadcastReceiver:
    """Rank 1..N: receives every bucket into a fresh buffer and yields views of it by name.

    Receives are serialised by a lock, held until the last bucket is consumed: two interleaved
    receives would mix up the collectives.
    """

    def __init__(self, cfg: BroadcastSync, group: GroupAddress | None, rank: int) -> None:
        if rank < 1:
            raise ValueError(f"a broadcast weight receiver needs a rank 1..N (rank 0 is the trainer), got {rank}")
        self.cfg = cfg
        self.rank = rank
        self._lock = threading.Lock()
        self._abandoned = threading.Event()
        self._store, self._pg, self._device = _join_group(cfg, group, rank)

    def receive_buckets(self, handle: WeightHandle) -> Iterator[dict[str, torch.Tensor]]:
        _check_transport(handle, "broadcast")
        with self._lock:
            yield from self._receive(handle)

    def _receive(self, handle: WeightHandle) -> Iterator[dict[str, torch.Tensor]]:
        plan: BroadcastPlan = handle.payload
        v = handle.version
        header = torch.empty(2, dtype=torch.int64, device=self._device)
        _broadcast(self._pg, header, self.cfg.timeout_s, f"v{v} header (rank {self.rank})", self._abandoned)
        sent_version, n_buckets = header.tolist()
        if (sent_version, n_buckets) != (v, len(plan.buckets)):
            raise RuntimeError(
                f"broadcast weight sync: rank {self.rank} asked for v{v} ({len(plan.buckets)} buckets) "
                f"but the trainer is sending v{sent_version} ({n_buckets} buckets); every worker "
                "must receive every published version, in order"
            )
        for i, bucket in enumerate(plan.buckets):
            flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=self._device)
            if bucket.numel:
                what = f"v{v} bucket {i + 1}/{n_buckets} (rank {self.rank})"
                _broadcast(self._pg, flat, self.cfg.timeout_s, what, self._abandoned)
            yield {
                slot.name: flat[slot.offset : slot.offset + torch.Size(slot.shape).numel()].view(slot.shape)
                for slot in bucket.slots
            }

    def close(self) -> None:
        self._pg = self._store = None

    def abandon(self) -> None:
        """Leave the group for a new one (a member died): a receive in progress raises SyncAbandoned,
        and so does every later one."""
        _abandon(self._abandoned, self._pg)
