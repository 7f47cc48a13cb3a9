"""The RolloutWorker: one frozen, versioned policy snapshot that turns prompts into scored groups.

A plain class (usable in-process) that the driver turns into a Ray actor with `ray.remote`. It
generates `group_size` completions per prompt with the rollout engine, scores them with the reward
functions, and puts the groups into the TrajectoryBuffer.

Weights arrive on a second thread (the actor's `control` concurrency group): `offer_weights`
receives a published snapshot, bucket by bucket, while a generation may be running and stages it
in CPU memory (a GPU holds one received bucket at a time, never a second copy of the model); the
generation thread loads it, bucket by bucket, before each generate call (`_apply_staged`), or at a
chunk boundary inside one with `rollout.interruptible`. A sample never mixes two versions silently: every token
records the version that sampled it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from tidal.config import (
    DataConfig,
    EnvSpec,
    EvalConfig,
    ModelConfig,
    RewardsConfig,
    RolloutConfig,
    RunConfig,
    WeightSyncConfig,
)
from tidal.metrics import Metrics, largest, mean, smallest, total
from tidal.models import load_model, load_tokenizer
from tidal.rollout.engine import Engine, TransformersEngine
from tidal.rollout.env_runtime import build_runtimes, generate_samples, group_by_env, score_samples
from tidal.rollout.evaluate import evaluate, own_forward
from tidal.types import Group, Prompt, RolloutResult, Sample, SamplingParams, SyncStats, mix_seed
from tidal.weight_sync import WeightHandle, WeightReceiver, make_receiver

log = logging.getLogger(__name__)

CONCURRENCY_GROUPS = {"control": 1}
"""Ray concurrency groups of the worker actor: weight offers run beside generation, one at a time."""


@dataclass(frozen=True)
class WorkerConfig:
    """The config sections a rollout worker uses."""

    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig
    rewards: RewardsConfig
    envs: list[EnvSpec]
    eval: EvalConfig
    weight_sync: WeightSyncConfig
    seed: int
    timeout_s: float
    """Longest wait for weights (`ray.timeout_s`)."""

    @classmethod
    def of(cls, cfg: RunConfig) -> WorkerConfig:
        return cls(cfg.model, cfg.data, cfg.rollout, cfg.rewards, cfg.envs, cfg.eval, cfg.weight_sync, cfg.seed,
                   cfg.ray.timeout_s)  # fmt: skip


def sampling_params(r: RolloutConfig, seed: int) -> SamplingParams:
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                          stop=list(r.stop), seed=seed)  # fmt: skip


class RolloutWorker:
    def __init__(self, cfg: WorkerConfig, model_dir: str, index: int = 0, buffer: Any = None) -> None:
        torch.set_num_threads(max(1, math.ceil(cfg.rollout.num_cpus_per_worker)))
        self.cfg = cfg
        self.index = index
        self.buffer = buffer
        self.engine = build_engine(cfg.model, cfg.rollout, model_dir, seed=mix_seed(cfg.seed, index))
        self._forward_model = own_forward(self.engine)  # for the held-out log-prob check
        self.envs = build_runtimes(cfg.envs, cfg.rewards, cfg.data)
        self._receiver: WeightReceiver | None = None
        self._staged: tuple[list[dict[str, torch.Tensor]], int] | None = None
        self._cv = threading.Condition()
        self._last_end = time.perf_counter()

    @property
    def version(self) -> int:
        return self.engine.version

    # ------------------------------------------------------------------------- control thread

    @ray.method(concurrency_group="control")
    def join_weight_sync(self, group: tuple[str, int, int] | None) -> None:
        """Build this worker's receiving end (for `broadcast`: join the trainer's group as rank index + 1)."""
        self._receiver = make_receiver(self.cfg.weight_sync, group, rank=self.index + 1)

    @ray.method(concurrency_group="control")
    def offer_weights(self, handle: WeightHandle) -> SyncStats:
        """Receive a published snapshot and stage it for the generation thread."""
        t0 = time.perf_counter()
        if self._receiver is None:
            self._receiver = make_receiver(self.cfg.weight_sync)
        buckets = [{name: t.cpu() for name, t in bucket.items()} for bucket in self._receiver.receive_buckets(handle)]
        seconds = time.perf_counter() - t0
        self._check_fits(buckets, handle.version)
        with self._cv:
            if self._staged is None or handle.version > self._staged[1]:
                self._staged = (buckets, handle.version)
            self._cv.notify_all()
        return SyncStats(handle.version, handle.nbytes, seconds)

    # ---------------------------------------------------------------------- generation thread

    def rollout(self, prompts: list[Prompt], seed: int, batch_id: int = 0, min_version: int = 0) -> RolloutResult:
        """Generate and score one group per prompt with weights of version >= `min_version`.

        Puts the groups into the buffer under `batch_id` when one is attached (and then returns no
        groups), else returns them. Metrics are this call's.
        """
        t0 = time.perf_counter()
        idle = t0 - self._last_end
        weight_wait = self._wait_for_version(min_version)
        t_gen0 = time.perf_counter()
        samples = self._generate(prompts, seed)
        t_gen = time.perf_counter() - t_gen0
        metrics = score_samples(self.envs, samples)
        by_group: dict[int, list[Sample]] = {p.group_id: [] for p in prompts}
        for s in samples:
            by_group[s.group_id].append(s)
        groups = [Group(gid, group) for gid, group in by_group.items()]
        n = float(len(samples))
        metrics.update({
            "rollout/response_length": mean(sum(len(s.response_ids) for s in samples) / max(n, 1.0), n),
            "rollout/truncated_frac": mean(sum(s.finish_reason == "length" for s in samples) / max(n, 1.0), n),
            "rollout/samples": total(n),
            "rollout/interrupted_samples": total(float(sum(len(set(s.versions)) > 1 for s in samples))),
            "async/worker_version": smallest(float(self.version)),  # the furthest behind
            "async/worker_idle_s": largest(idle),
            "async/worker_weight_wait_s": largest(weight_wait),
            "perf/rollout_tokens": total(float(sum(sum(s.loss_mask) for s in samples))),
            "perf/generate_time_s": largest(t_gen),  # workers generate side by side
        })  # fmt: skip
        if self.buffer is not None:
            slim = [Group(g.group_id, [s.for_training() for s in g.samples]) for g in groups]
            ray.get(self.buffer.put.remote(slim, batch_id))
            groups = []
        metrics["perf/rollout_time_s"] = largest(time.perf_counter() - t0)
        self._last_end = time.perf_counter()
        return RolloutResult(groups, metrics)

    def _generate(self, prompts: list[Prompt], seed: int) -> list[Sample]:
        """`group_size` unscored samples per prompt, env by env; newer weights are applied before
        every generate call, and inside them with `rollout.interruptible`."""
        r = self.cfg.rollout
        on_chunk = self._at_chunk_boundary if r.interruptible else None
        samples: list[Sample] = []
        for k, (label, group) in enumerate(group_by_env(prompts).items()):
            params = sampling_params(r, mix_seed(seed, k))
            samples += generate_samples(self.envs[label], self.engine, group, r.group_size, params, r,
                                        between_generations=self._apply_staged, on_chunk=on_chunk)  # fmt: skip
        return samples

    def _at_chunk_boundary(self) -> None:
        """Interruptible generation's hook inside a generate call: newer weights go in between chunks."""
        self._apply_staged()

    def _wait_for_version(self, min_version: int) -> float:
        """Block until weights of version >= `min_version` are held or staged, apply them; seconds waited."""
        t0 = time.perf_counter()
        timeout = self.cfg.timeout_s

        def ready() -> bool:
            staged = self._staged[1] if self._staged is not None else -1
            return max(staged, self.engine.version) >= min_version

        with self._cv:
            if not self._cv.wait_for(ready, timeout=timeout):
                raise TimeoutError(f"rollout worker {self.index} waited {timeout:g}s (ray.timeout_s) for weights "
                                   f"v{min_version} but holds v{self.version}; did a weight sync fail?")  # fmt: skip
        self._apply_staged()
        return time.perf_counter() - t0

    def _apply_staged(self) -> None:
        """Load the staged snapshot, if it is newer than the weights held (generation thread only)."""
        with self._cv:
            staged, self._staged = self._staged, None
        if staged is None or staged[1] <= self.engine.version:
            return
        self.engine.load_weights(*staged)

    def load_weights(self, snapshot: tuple[dict[str, torch.Tensor], int]) -> int:
        """Load a (state dict, version) snapshot now (in-process use); returns the version held."""
        state, version = snapshot
        self._check_fits([state], version)
        with self._cv:
            self._staged = ([state], version)
        self._apply_staged()
        return self.version

    def _check_fits(self, buckets: list[dict[str, torch.Tensor]], version: int) -> None:
        # Checked before staging: a snapshot that does not fit must leave the old weights intact.
        names, got = self.engine.weight_names(), {name for bucket in buckets for name in bucket}
        missing, unexpected = sorted(names - got), sorted(got - names)
        if missing or unexpected:
            raise RuntimeError(f"weight snapshot v{version} does not fit the rollout model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")  # fmt: skip

    def evaluate(self, prompts: list[Prompt], min_version: int = 0) -> Metrics:
        """Greedy held-out metrics with weights of version >= `min_version`, scored by each env (the
        run's rewards without `envs`) exactly as in training."""
        self._wait_for_version(min_version)
        out, _ = evaluate(self.engine, self.envs, prompts, self.cfg.eval, self.cfg.rollout, self._forward_model)
        return {**out, "eval/version": largest(float(self.version))}


def build_engine(model: ModelConfig, rollout: RolloutConfig, model_dir: str, seed: int = 0) -> Engine:
    """The rollout engine `rollout.engine` names, over the policy in `model_dir`, at version 0."""
    if rollout.engine == "vllm":
        from tidal.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, load_tokenizer(model_dir), rollout.vllm, dtype=model.dtype, seed=seed)
    dtype = torch.bfloat16 if model.dtype == "bfloat16" else torch.float32
    policy = load_model(model_dir, dtype, model.attn_implementation)
    if rollout.num_gpus_per_worker > 0 and torch.cuda.is_available():
        policy.to("cuda")  # Ray made the worker's GPU the only visible one
    return TransformersEngine(policy, load_tokenizer(model_dir), version=0)
