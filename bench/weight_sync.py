"""Weight sync: what a publish costs the trainer, and how long until a worker holds the weights.

For the tiny preset and a ~500 MB fp32 Qwen3-MoE (the preset's config scaled up, random init), the
driver plays the trainer and one Ray actor plays a rollout worker. Per transport it times the
trainer's `publish` (what blocks training) and the end-to-end time until the actor holds the state
dict, against a plain in-process copy (`{k: v.clone()}`). Variants are interleaved round-robin so
that load from other processes falls on all alike; the median over the repeats is reported, after
one untimed warm-up round. Each transport's result is checked bit for bit once (by digest).

Then the trainer's own publish (`TrainerActor.publish`, gathering from DeepSpeed ZeRO-3 and casting
to the rollout dtype, bucket by bucket) with 1 and 2 ranks, fp32 and bf16: its time and its peak
extra memory, against a plain clone of the same state dict.

    .venv/bin/python bench/weight_sync.py [--repeats 5] [--layers 18] [--bucket-mb 256] [--dir /tmp]
                                          [--trainer-layers 6] [--trainer-bucket-mb 16]
                                          [--only transports|trainer]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from tidal.config import WeightSyncConfig
from tidal.weight_sync import (
    WeightHandle,
    WeightReceiver,
    buckets,
    make_publisher,
    make_receiver,
    sync_group_address,
)


def whole(receiver: Any, handle: WeightHandle) -> dict[str, torch.Tensor]:
    """The snapshot `handle` names, received as one state dict."""
    return {name: t for bucket in receiver.receive_buckets(handle) for name, t in bucket.items()}


TRANSPORTS = ("object_store", "broadcast", "disk")
WIDE = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
"""The preset's Qwen3-MoE widened: ~28 MB of fp32 weights per layer."""


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state.items()):  # sorted: a safetensors file holds its tensors by name
        h.update(name.encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@ray.remote(num_cpus=1, max_concurrency=2)
class Receiver:
    """A rollout worker reduced to its weight sync: holds the last state dict it received."""

    def __init__(self) -> None:
        self.receivers: dict[str, WeightReceiver] = {}
        self.state: dict[str, torch.Tensor] = {}

    def open(self, transport: str, cfg: WeightSyncConfig, group: tuple[str, int, int] | None) -> None:
        self.receivers[transport] = make_receiver(cfg, group, rank=1)

    def receive(self, handle: WeightHandle) -> int:
        self.state = {}  # the old weights go before the new arrive, as in a worker short of memory
        self.state = whole(self.receivers[handle.transport], handle)
        return handle.version

    def digest(self) -> str:
        return digest(self.state)

    def close(self) -> None:
        for r in self.receivers.values():
            r.close()


def build_state(name: str, layers: int) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tidal.model.loading import load_model, materialize_preset

    path = materialize_preset("tiny-qwen3-moe", seed=0)
    if name == "tiny-qwen3-moe":
        return load_model(path).state_dict()
    config = AutoConfig.from_pretrained(path, num_hidden_layers=layers, **WIDE)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()


def open_transports(actor: Any, tmp: Path, bucket_mb: float) -> dict[str, Any]:
    """Publishers here and receivers in the actor; the broadcast group is joined by both at once."""
    publishers = {}
    for transport in TRANSPORTS:
        spec: dict[str, Any] = {"type": transport}
        if transport == "broadcast":
            spec.update(backend="gloo")
        cfg = WeightSyncConfig.model_validate({"transport": spec, "bucket_mb": bucket_mb})
        group = (*sync_group_address(), 2) if transport == "broadcast" else None
        opened = actor.open.remote(transport, cfg, group)
        publishers[transport] = make_publisher(cfg, tmp / "weights", group)
        ray.get(opened, timeout=120)
    return publishers


Times = dict[str, tuple[list[float], list[float]]]
"""Per variant: (publish times, end-to-end times) in seconds."""


def bench_model(
    state: dict[str, torch.Tensor],
    actor: Any,
    publishers: dict[str, Any],
    repeats: int,
    first_version: int,
    bucket_mb: float,
) -> Times:
    times: Times = {v: ([], []) for v in ("copy", *TRANSPORTS)}
    version = first_version
    for i in range(1 + repeats):
        t0 = time.perf_counter()
        copy = {k: v.clone() for k, v in state.items()}
        t_copy = time.perf_counter() - t0
        del copy
        if i:
            times["copy"][0].append(t_copy)
            times["copy"][1].append(t_copy)
        for transport, publisher in publishers.items():
            version += 1
            t0 = time.perf_counter()
            handle = publisher.publish(buckets(state.items(), int(bucket_mb * 2**20)), version)
            t_pub = time.perf_counter() - t0
            assert ray.get(actor.receive.remote(handle), timeout=600) == version
            t_e2e = time.perf_counter() - t0
            if i:
                times[transport][0].append(t_pub)
                times[transport][1].append(t_e2e)
            else:  # the warm-up round checks the received weights bit for bit
                assert ray.get(actor.digest.remote(), timeout=600) == digest(state), f"{transport}: weights differ"
    return times


def report(name: str, state: dict[str, torch.Tensor], times: Times) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(
        f"\n{name}: {len(state)} tensors, {nbytes / 1e6:.1f} MB fp32; median (min-max) of "
        f"{len(times['copy'][0])} repeats"
    )
    base = statistics.median(times["copy"][0])
    print(
        f"{'variant':<13} {'publish s':>10} {'(min-max)':>15} {'GB/s':>6} {'/copy':>6}   "
        f"{'e2e s':>7} {'(min-max)':>15} {'GB/s':>6} {'/copy':>6}"
    )
    for variant, (pub, e2e) in times.items():
        p, e = statistics.median(pub), statistics.median(e2e)
        print(
            f"{variant:<13} {p:>10.4f} {f'({min(pub):.4f}-{max(pub):.4f})':>15} {nbytes / p / 1e9:>6.2f} "
            f"{p / base:>5.2f}x   {e:>7.4f} {f'({min(e2e):.4f}-{max(e2e):.4f})':>15} {nbytes / e / 1e9:>6.2f} "
            f"{e / base:>5.2f}x"
        )


# ------------------------------------------------------------------------- the trainer's publish


def save_model(layers: int, out: Path) -> Path:
    """The large model of `build_state` as a model directory with the preset's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tidal.model.loading import load_tokenizer, materialize_preset

    path = materialize_preset("tiny-qwen3-moe", seed=0)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(path, num_hidden_layers=layers, **WIDE)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    load_tokenizer(str(path)).save_pretrained(out)
    return out


def bench_trainer_publish(model_dir: Path, weights_dir: Path, repeats: int, bucket_mb: float) -> None:
    """`TrainerActor.publish` of 1 and 2 ZeRO-3 ranks, fp32 and bf16 rollout dtype, through the disk
    transport (files are not the process's memory, so the peak is the trainer's own), against a
    plain clone of the same fp32 state dict in this process."""
    from tidal.config import load_config
    from tidal.model.loading import load_model
    from tidal.telemetry.metrics import PeakRSS, values
    from tidal.trainer.actor import TrainerActor, TrainerActorConfig
    from tidal.trainer.group import TrainerGroup

    state = load_model(str(model_dir)).state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    clone_s, clone_mem = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            copy = {k: v.clone() for k, v in state.items()}
        clone_s.append(time.perf_counter() - t0)
        clone_mem.append(peak.growth or 0)
        del copy
    del state
    rows = [("clone() fp32", statistics.median(clone_s), max(clone_mem))]
    for dtype in ("float32", "bfloat16"):
        for ranks in (1, 2):
            cfg = load_config(
                None,
                [
                    f"model.path={model_dir}",
                    f"model.dtype={dtype}",
                    "trainer.lr=1e-5",
                    "trainer.zero_stage=3",
                    f"trainer.num_ranks={ranks}",
                    "weight_sync.transport.type=disk",
                    f"weight_sync.transport.dir={weights_dir}",
                    f"weight_sync.bucket_mb={bucket_mb}",
                ],
            ).for_rl()
            group = TrainerGroup(TrainerActor, cfg.trainer, (TrainerActorConfig.of(cfg), str(model_dir)), 600)
            times, mems = [], []
            for _ in range(1 + repeats):  # the first publish warms up
                _, metrics = ray.get(group.call("publish"), timeout=600)[0]
                m = values(metrics)
                times.append(m["perf/publish_time_s"])
                mems.append(m["perf/publish_peak_mem_mb"] * 2**20)
            group.close()
            rows.append(
                (
                    f"{ranks} rank{'s' if ranks > 1 else ''} {'fp32' if dtype == 'float32' else 'bf16'}",
                    statistics.median(times[1:]),
                    max(mems[1:]),
                )
            )
    print(
        f"\ntrainer publish (ZeRO-3, disk transport, {bucket_mb:g} MB buckets) of a {nbytes / 2**20:.0f} MB fp32 "
        f"model; median time and largest peak of {repeats} publishes after one warm-up"
    )
    base_s, base_mem = rows[0][1], rows[0][2]
    print(f"{'variant':<14} {'time s':>8} {'/clone':>7} {'peak MB':>8} {'/model':>7} {'/clone':>7}")
    for name, t, mem in rows:
        print(
            f"{name:<14} {t:>8.3f} {t / base_s:>6.2f}x {mem / 2**20:>8.0f} {mem / nbytes:>6.2f}x "
            f"{mem / base_mem:>6.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per model")
    ap.add_argument("--layers", type=int, default=18, help="layers of the large model (18: ~510 MB)")
    ap.add_argument("--bucket-mb", type=float, default=256.0, help="weight_sync.bucket_mb of every transport")
    ap.add_argument("--dir", default=None, help="where the disk transport writes (default: a temp dir)")
    ap.add_argument("--trainer-layers", type=int, default=6, help="layers of the trainer section's model (6: ~160 MB)")
    ap.add_argument("--trainer-bucket-mb", type=float, default=16.0, help="its weight_sync.bucket_mb")
    ap.add_argument("--only", choices=["transports", "trainer"], help="run one section")
    args = ap.parse_args()

    logging.getLogger("transformers").setLevel(logging.ERROR)
    # glibc maps allocations over 1 MB and unmaps them on free (no adaptive threshold that keeps freed
    # blocks resident), so resident memory follows what a process holds and peaks are comparable.
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, runtime_env={"env_vars": env})
    if args.only != "trainer":
        bench_transports(args)
    if args.only != "transports":
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            model_dir = save_model(args.trainer_layers, Path(tmp) / "model")
            bench_trainer_publish(model_dir, Path(tmp) / "weights", args.repeats, args.trainer_bucket_mb)
    print(f"\n{torch.get_num_threads()} torch threads, {os.cpu_count()} cpus, {platform.machine()}")
    ray.shutdown()


def bench_transports(args: argparse.Namespace) -> None:
    actor = Receiver.remote()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        publishers = open_transports(actor, Path(tmp), args.bucket_mb)
        for i, name in enumerate(("tiny-qwen3-moe", f"qwen3-moe-{args.layers}L-h512")):
            state = build_state(name, args.layers)
            # Versions go on across models, as they would across a run.
            times = bench_model(
                state, actor, publishers, args.repeats, first_version=i * 1000, bucket_mb=args.bucket_mb
            )
            report(name, state, times)
        for p in publishers.values():
            p.close()
        ray.get(actor.close.remote())
    ray.kill(actor)  # its CPU goes to the trainer ranks
    print(
        f"\nbroadcast: gloo; {args.bucket_mb:g} MB buckets; disk: {args.dir or tempfile.gettempdir()}; "
        "e2e = publish + the actor's receive call, until it returns"
    )


if __name__ == "__main__":
    main()
