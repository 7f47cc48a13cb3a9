"""The RolloutWorker: one frozen, versioned policy snapshot that turns prompts into scored groups.

A plain class (usable in-process) that the driver turns into a Ray actor with `ray.remote`. It
generates `group_size` completions per prompt with the rollout engine, scores them with the reward
functions, and puts the groups into the TrajectoryBuffer.

Weights arrive on a second thread (the actor's `control` concurrency group): `offer_weights`
receives a published snapshot while a generation may be running and stages it; the generation
thread applies it between generations, or at a chunk boundary inside one with
`rollout.interruptible`. A sample never mixes two versions silently: every token records the
version that sampled it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import ray
import torch

from tidal.config import RunConfig
from tidal.models import load_model, load_tokenizer
from tidal.rollout.engine import Engine, TransformersEngine
from tidal.rollout.env_runtime import build_runtimes, eval_metrics, generate_samples, group_by_env, score_samples
from tidal.rollout.evaluate import evaluate
from tidal.trainer.weight_sync import WeightHandle, WeightReceiver, make_receiver
from tidal.types import Group, Prompt, Sample, SamplingParams

log = logging.getLogger(__name__)

CONCURRENCY_GROUPS = {"control": 1}
"""Ray concurrency groups of the worker actor: weight offers run beside generation, one at a time."""


def sampling_params(cfg: RunConfig, seed: int) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, stop=list(r.stop), seed=seed)  # fmt: skip


class RolloutWorker:
    def __init__(self, cfg: RunConfig, model_dir: str, index: int = 0, buffer: Any = None) -> None:
        torch.set_num_threads(max(1, math.ceil(cfg.rollout.num_cpus_per_worker)))
        self.cfg = cfg
        self.index = index
        self.buffer = buffer
        self.engine = build_engine(cfg, model_dir, seed=cfg.seed * 1_000_003 + index)
        self.envs = build_runtimes(cfg)
        self._receiver: WeightReceiver | None = None
        self._staged: tuple[dict[str, torch.Tensor], int] | None = None
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
    def offer_weights(self, handle: WeightHandle) -> dict[str, float]:
        """Receive a published snapshot and stage it for the generation thread; returns sync stats."""
        t0 = time.perf_counter()
        if self._receiver is None:
            self._receiver = make_receiver(self.cfg.weight_sync)
        state = self._receiver.receive(handle)
        seconds = time.perf_counter() - t0
        self._check_fits(state, handle.version)
        with self._cv:
            if self._staged is None or handle.version > self._staged[1]:
                self._staged = (state, handle.version)
            self._cv.notify_all()
        return {"version": float(handle.version), "bytes": float(handle.nbytes), "seconds": seconds}

    # ---------------------------------------------------------------------- generation thread

    def rollout(
        self, prompts: list[Prompt], seed: int, batch_id: int = 0, min_version: int = 0
    ) -> tuple[list[Group], dict[str, float]]:
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
        tokens = sum(sum(s.loss_mask) for s in samples)
        metrics.update({
            "rollout/response_length": sum(len(s.response_ids) for s in samples) / max(len(samples), 1),
            "rollout/truncated_frac": _mean([float(s.finish_reason == "length") for s in samples]),
            "rollout/samples": float(len(samples)),
            "rollout/interrupted_samples": float(sum(len(set(s.versions)) > 1 for s in samples)),
            "async/worker_version": float(self.version),
            "async/worker_idle_s": idle,
            "async/worker_weight_wait_s": weight_wait,
            "perf/rollout_tokens": float(tokens),
            "perf/generate_time_s": t_gen,
        })  # fmt: skip
        if self.buffer is not None:
            ray.get(self.buffer.put.remote(groups, batch_id))
            groups = []
        metrics["perf/rollout_time_s"] = time.perf_counter() - t0
        self._last_end = time.perf_counter()
        return groups, metrics

    def _generate(self, prompts: list[Prompt], seed: int) -> list[Sample]:
        """`group_size` unscored samples per prompt, env by env, with the weights held (newer ones are
        applied between generate calls, and inside them with `rollout.interruptible`)."""
        on_chunk = self._apply_staged if self.cfg.rollout.interruptible else None
        calls = 0

        def params(_: int) -> SamplingParams:
            nonlocal calls
            self._apply_staged()  # between generations, newer weights always go in
            calls += 1
            return sampling_params(self.cfg, seed=seed * 1_000_003 + calls - 1)

        samples: list[Sample] = []
        for label, group in group_by_env(prompts).items():
            samples += generate_samples(self.envs[label], self.engine, group, self.cfg.rollout.group_size, params,
                                        self.cfg, on_chunk)  # fmt: skip
        return samples

    def _wait_for_version(self, min_version: int) -> float:
        """Block until weights of version >= `min_version` are held or staged, apply them; seconds waited."""
        t0 = time.perf_counter()
        timeout = self.cfg.ray.timeout_s

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
        self._check_fits(state, version)
        with self._cv:
            self._staged = (state, version)
        self._apply_staged()
        return self.version

    def _check_fits(self, state: dict[str, torch.Tensor], version: int) -> None:
        # Checked before staging: a snapshot that does not fit must leave the old weights intact.
        names = self.engine.weight_names()
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unexpected:
            raise RuntimeError(f"weight snapshot v{version} does not fit the rollout model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")  # fmt: skip

    def evaluate(self, prompts: list[Prompt], min_version: int = 0) -> dict[str, float]:
        """Greedy held-out metrics with weights of version >= `min_version`: exact-match accuracy and
        the log-prob mismatch on the run's data, or each env's accuracy and reward with `envs`."""
        self._wait_for_version(min_version)
        if not self.cfg.envs:
            rows = [p.row for p in prompts]
            out = evaluate(self.engine, rows, self.cfg.data, self.cfg.eval, batch_size=self.cfg.rollout.batch_size)
        else:
            params = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.eval.max_new_tokens, seed=0)
            samples = []
            for label, group in group_by_env(prompts).items():
                group = group[: self.cfg.eval.num_samples]  # per env, so every env is evaluated
                samples += generate_samples(self.envs[label], self.engine, group, 1, lambda _: params, self.cfg)
            out = eval_metrics(self.envs, samples)
        return {**out, "eval/version": float(self.version)}


def build_engine(cfg: RunConfig, model_dir: str, seed: int = 0) -> Engine:
    """The rollout engine `rollout.engine` names, over the policy in `model_dir`, at version 0."""
    if cfg.rollout.engine == "vllm":
        from tidal.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, load_tokenizer(model_dir), cfg.rollout.vllm, dtype=cfg.model.dtype, seed=seed)
    model = load_model(model_dir, torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32)
    if cfg.rollout.num_gpus_per_worker > 0 and torch.cuda.is_available():
        model.to("cuda")  # Ray made the worker's GPU the only visible one
    return TransformersEngine(model, load_tokenizer(model_dir), version=0)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
