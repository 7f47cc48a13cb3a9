"""Weight sync from a trainer actor to two worker actors, for every transport: the workers end up
with weights bit-identical to the published version, over successive versions, without the trainer
ever waiting for them in `publish`."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from tidal.config import WeightSyncConfig
from tidal.model.loading import load_model, materialize_preset
from tidal.weight_sync import (
    SyncAbandoned,
    WeightHandle,
    WeightPublisher,
    WeightReceiver,
    buckets,
    make_publisher,
    make_receiver,
    sync_group_address,
)
from tidal.weight_sync.broadcast import BroadcastPlan


def whole(receiver: Any, handle: WeightHandle) -> dict[str, torch.Tensor]:
    """The snapshot `handle` names, received as one state dict."""
    return {name: t for bucket in receiver.receive_buckets(handle) for name, t in bucket.items()}


pytestmark = pytest.mark.integration
# The actors import tidal, not this test module: what they call of it travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT_S = 60.0
BUCKET_BYTES = 10_000
"""Buckets of 10 KB: dozens of them for the tiny preset."""
"""Bound of every ray.get here: a deadlocked sync fails the test instead of hanging it."""


@ray.remote(num_cpus=1)
class Trainer:
    """Plays the trainer: a model whose weights change each step, and a publisher."""

    def __init__(self, model_dir: str) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.model = load_model(model_dir)
        self.version = 0
        self.publisher: Any = None
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def group_address(self) -> tuple[str, int]:
        return sync_group_address()

    def open(self, cfg: WeightSyncConfig, weights_dir: str, group: tuple[str, int, int] | None) -> None:
        self.publisher = make_publisher(cfg, Path(weights_dir), group)

    def step_and_publish(self) -> WeightHandle:
        self._perturb()
        self.version += 1
        state = self.model.state_dict()
        self.snapshots[self.version] = {k: v.clone() for k, v in state.items()}
        handle = self.publisher.publish(buckets(state.items(), BUCKET_BYTES), self.version)
        # The next optimizer step runs before any worker has received: the published version must
        # not see it.
        self._perturb()
        return handle

    def snapshot(self, version: int) -> dict[str, torch.Tensor]:
        return self.snapshots[version]

    def close(self) -> None:
        self.publisher.close()

    @torch.no_grad()
    def _perturb(self) -> None:
        for p in self.model.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)


# Two threads, as a rollout worker receives in a control thread while it may be generating.
@ray.remote(num_cpus=1, max_concurrency=2)
class Worker:
    """Plays a rollout worker: receives, loads with load_state_dict, reports the version it holds."""

    def __init__(self, model_dir: str) -> None:
        torch.set_num_threads(1)
        self.model = load_model(model_dir)
        self.version = 0
        self.receiver: Any = None

    def open(self, cfg: WeightSyncConfig, group: tuple[str, int, int] | None, rank: int) -> None:
        self.receiver = make_receiver(cfg, group, rank)

    def receive(self, handle: WeightHandle) -> int:
        self.model.load_state_dict(whole(self.receiver, handle))
        self.version = handle.version
        return self.version

    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self.version, self.model.state_dict()

    def close(self) -> None:
        self.receiver.close()


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_preset("tiny-qwen3-moe", seed=0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init()  # the session's runtime (tests/conftest.py)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def actors(cluster: None, preset: Path) -> tuple[Any, list[Any]]:
    """One trainer and two workers, shared by the transports (actor start-up dominates the time)."""
    return Trainer.remote(str(preset)), [Worker.remote(str(preset)) for _ in range(2)]


TRANSPORTS = {
    "object_store": {"type": "object_store"},
    "broadcast": {"type": "broadcast", "backend": "gloo", "timeout_s": 30},
    "disk": {"type": "disk", "keep": 2},
}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_workers_get_the_published_weights(actors: tuple[Any, list[Any]], transport: str, tmp_path: Path) -> None:
    trainer, workers = actors
    cfg = WeightSyncConfig.model_validate({"transport": TRANSPORTS[transport]})
    group = None
    if transport == "broadcast":
        address, port = ray.get(trainer.group_address.remote(), timeout=WAIT_S)
        group = (address, port, 1 + len(workers))
    # Built concurrently: a broadcast group forms only once every rank has joined.
    opened = [trainer.open.remote(cfg, str(tmp_path), group)]
    opened += [w.open.remote(cfg, group, rank) for rank, w in enumerate(workers, start=1)]
    ray.get(opened, timeout=WAIT_S)

    seen: list[dict[str, torch.Tensor]] = []
    for _ in range(2):
        # publish returns before any worker is asked to receive: it never waits for them.
        handle: WeightHandle = ray.get(trainer.step_and_publish.remote(), timeout=WAIT_S)
        assert handle.transport == transport
        versions = ray.get([w.receive.remote(handle) for w in workers], timeout=WAIT_S)
        assert versions == [handle.version] * len(workers)

        published = ray.get(trainer.snapshot.remote(handle.version), timeout=WAIT_S)
        assert handle.nbytes == sum(t.numel() * t.element_size() for t in published.values())
        for version, held in ray.get([w.weights.remote() for w in workers], timeout=WAIT_S):
            assert version == handle.version
            assert held.keys() == published.keys()
            for name, t in published.items():
                assert torch.equal(held[name], t), f"{transport} v{version}: {name} differs from the trainer's"
        seen.append(published)

        # Published as it streamed in: a piece per bucket (dozens; the embeddings and fused experts
        # exceed one and travel alone), never merged into one whole copy.
        if transport == "broadcast":
            plan: BroadcastPlan = handle.payload
            assert len(plan.buckets) > 20
            assert any(len(b.slots) == 1 and b.numel * 4 > BUCKET_BYTES for b in plan.buckets)
            assert all(b.numel * 4 <= BUCKET_BYTES for b in plan.buckets if len(b.slots) > 1)
        if transport == "object_store":
            assert len(handle.payload) > 20
        if transport == "disk":
            files = sorted(p.name for p in Path(handle.payload.path).iterdir())
            assert len(files) > 20 and files == list(handle.payload.files)

    assert not all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0]), "the two versions must differ"
    ray.get([trainer.close.remote()] + [w.close.remote() for w in workers], timeout=WAIT_S)


def test_disk_keeps_the_newest_files_and_names_a_removed_one(tmp_path: Path) -> None:
    cfg = WeightSyncConfig.model_validate({"transport": {"type": "disk", "keep": 2, "dir": str(tmp_path / "w")}})
    publisher, receiver = make_publisher(cfg, tmp_path / "unused"), make_receiver(cfg)
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    handles = [publisher.publish({k: v + i for k, v in state.items()}, version=i) for i in range(1, 4)]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["v00000002", "v00000003"]
    assert torch.equal(whole(receiver, handles[2])["w"], state["w"] + 3)
    with pytest.raises(FileNotFoundError, match=r"v00000001 \(v1\) was removed.*keep \(now 2\)"):
        whole(receiver, handles[0])
    # A restarted run counts from v1 again: the previous run's newer-numbered files must not push
    # its fresh file out.
    restarted = make_publisher(cfg, tmp_path / "unused").publish(state, version=1)
    assert torch.equal(whole(receiver, restarted)["b"], state["b"])


def _broadcast_group(cfg: WeightSyncConfig, workers: int) -> tuple[WeightPublisher, list[WeightReceiver]]:
    """A publisher and `workers` receivers in this process, joined concurrently from threads."""
    address, port = sync_group_address()
    group = (address, port, 1 + workers)
    receivers: dict[int, WeightReceiver] = {}
    threads = [
        threading.Thread(target=lambda r=r: receivers.__setitem__(r, make_receiver(cfg, group, r)))
        for r in range(1, 1 + workers)
    ]
    for t in threads:
        t.start()
    publisher = make_publisher(cfg, Path("unused"), group)
    for t in threads:
        t.join(timeout=WAIT_S)
    return publisher, [receivers[r] for r in range(1, 1 + workers)]


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_every_dtype_and_layout_bit_for_bit(cluster: None, transport: str, tmp_path: Path) -> None:
    cfg = WeightSyncConfig.model_validate({"transport": TRANSPORTS[transport]})
    if transport == "broadcast":
        publisher, (receiver,) = _broadcast_group(cfg, workers=1)
    else:
        publisher, receiver = make_publisher(cfg, tmp_path), make_receiver(cfg)
    big = torch.randn(3, 50)
    state = {
        "big": big,
        "tied": big,  # tied embeddings share storage
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(10, 10).t(),
        "half": torch.randn(7).to(torch.bfloat16),
        "scalar": torch.tensor(3),
        "mask": torch.tensor([True, False, True]),
        "nan": torch.tensor([float("nan"), -0.0]),
    }
    # 100-byte buckets: tied tensors and dtypes land in different pieces.
    got = whole(receiver, publisher.publish(buckets(state.items(), 100), version=1))
    assert sorted(got) == sorted(state)
    for name, t in state.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        # Compared as bytes: torch.equal says nan != nan and -0.0 == 0.0.
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    publisher.close()
    receiver.close()


def test_broadcast_fails_with_a_clear_error_instead_of_hanging() -> None:
    cfg = WeightSyncConfig.model_validate({"transport": {"type": "broadcast", "timeout_s": 1}})
    publisher, (receiver,) = _broadcast_group(cfg, workers=1)
    publisher.publish({"w": torch.ones(4)}, version=1)  # returns although no worker receives
    with pytest.raises(RuntimeError, match=r"broadcast weight sync: sending v1 .* within timeout_s=1"):
        publisher.publish({"w": torch.ones(4)}, version=2)
    receiver.close()


def test_broadcast_names_a_skipped_version() -> None:
    cfg = WeightSyncConfig.model_validate({"transport": {"type": "broadcast", "timeout_s": 10}})
    publisher, (receiver,) = _broadcast_group(cfg, workers=1)
    v1 = publisher.publish({"w": torch.ones(4)}, version=1)
    assert torch.equal(whole(receiver, v1)["w"], torch.ones(4))
    publisher.publish({"w": torch.zeros(4)}, version=2)
    with pytest.raises(RuntimeError, match="asked for v1 .* sending v2"):
        whole(receiver, v1)
    receiver.close()


def _receive_all(receivers: list[WeightReceiver], handle: WeightHandle) -> list[Any]:
    """Each receiver's copy of `handle`, received side by side (a broadcast needs every member)."""
    got: list[Any] = [None] * len(receivers)
    threads = [
        threading.Thread(target=lambda i=i: got.__setitem__(i, whole(receivers[i], handle)["w"]))
        for i in range(len(receivers))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT_S)
    return got


def test_an_abandoned_broadcast_ends_at_once_and_a_new_group_forms() -> None:
    """A worker died: the others' receives, which would wait out timeout_s for a send that does not
    come, end when the group is abandoned, and every member (the dead one's successor too) joins a
    new one."""
    cfg = WeightSyncConfig.model_validate({"transport": {"type": "broadcast", "timeout_s": 120}})
    publisher, receivers = _broadcast_group(cfg, workers=2)
    v1 = publisher.publish({"w": torch.ones(8)}, version=1)
    assert all(torch.equal(w, torch.ones(8)) for w in _receive_all(receivers, v1))
    outcome: list[BaseException | None] = []

    def wait_for_a_send() -> None:  # none comes: the trainer's went to a dead member and failed
        try:
            whole(receivers[0], v1)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=wait_for_a_send)
    thread.start()
    time.sleep(1.0)
    assert not outcome, outcome
    t0 = time.monotonic()
    receivers[0].abandon()
    publisher.abandon()
    thread.join(timeout=30)
    assert time.monotonic() - t0 < 30 and len(outcome) == 1 and isinstance(outcome[0], SyncAbandoned), outcome
    with pytest.raises(SyncAbandoned):  # an abandoned receiver takes no further send
        whole(receivers[0], v1)
    publisher, receivers = _broadcast_group(cfg, workers=2)
    v2 = publisher.publish({"w": torch.arange(8.0)}, version=2)
    assert all(w is not None and torch.equal(w, torch.arange(8.0)) for w in _receive_all(receivers, v2))
    publisher.close()


@pytest.mark.gpu
def test_nccl_broadcast_bit_for_bit() -> None:
    if torch.cuda.device_count() < 2 or not hasattr(torch.distributed, "ProcessGroupNCCL"):
        pytest.skip("needs two CUDA GPUs (NCCL takes one per rank) and torch built with NCCL")
    import torch.multiprocessing as mp

    cfg = WeightSyncConfig.model_validate({"transport": {"type": "broadcast", "backend": "nccl"}})
    address, port = sync_group_address()
    group = (address, port, 2)
    ctx = mp.get_context("spawn")
    to_worker, from_worker = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_nccl_worker, args=(cfg, group, to_worker, from_worker))
    proc.start()
    torch.cuda.set_device(0)
    publisher = make_publisher(cfg, Path("unused"), group)
    state = {"w": torch.randn(1000, 7, device="cuda"), "h": torch.randn(33, device="cuda").half()}
    to_worker.put(publisher.publish(buckets(state.items(), 2000), version=1))
    got = from_worker.get(timeout=WAIT_S)
    proc.join(timeout=WAIT_S)
    publisher.close()
    for name, t in state.items():
        assert torch.equal(got[name], t.cpu()), name


def _nccl_worker(cfg: WeightSyncConfig, group: tuple[str, int, int], inbox: Any, outbox: Any) -> None:
    torch.cuda.set_device(1)
    receiver = make_receiver(cfg, group, rank=1)
    handle = inbox.get(timeout=WAIT_S)
    outbox.put({k: v.cpu() for k, v in whole(receiver, handle).items()})
    receiver.close()
