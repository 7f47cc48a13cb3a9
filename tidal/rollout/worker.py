"""The RolloutWorker: one frozen, versioned policy snapshot that turns prompts into scored groups.

A plain class (usable in-process) that the driver turns into a Ray actor with `ray.remote`. It
generates `group_size` completions per prompt with the rollout engine, scores them with the reward
functions, and puts the groups into the TrajectoryBuffer.

In a run the worker serves a queue (`serve`, a long-lived call on the generation thread): the
driver `submit`s work on the `queue` thread whenever the staleness bound allows. Streaming work is
one group per prompt; each generate call takes as many queued groups as `rollout.batch_size` rows
hold, and a group is scored and put into the buffer (on a scoring thread) the moment its last sample
ends, while the call goes on with the others. Fixed work (`rollout.deterministic`) is one seeded
call per share of a batch, exactly as `rollout` generates it. Held-out evaluations jump the queue
and run between two generate calls.

Weights arrive on a second thread (the actor's `control` concurrency group): `offer_weights`
receives a published snapshot while a generation may be running and stages it; the generation
thread loads it before each generate call, or at a chunk boundary inside one with
`rollout.interruptible` (`tidal.rollout.staging`). A sample never mixes two versions silently: every token
records the version that sampled it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
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
from tidal.model.loading import load_model, load_tokenizer
from tidal.model.lora import apply_lora
from tidal.rollout.engines.base import Engine
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.rollout.env_runtime import attach_agents, build_runtimes, generate_samples, group_by_env, score_samples
from tidal.rollout.evaluate import evaluate, own_forward
from tidal.rollout.queue import EvalRequest, Work, WorkQueue
from tidal.rollout.staging import WeightStage
from tidal.telemetry.metrics import Metrics, busy, largest, mean, merge, smallest, total
from tidal.types import Group, Prompt, RolloutResult, Sample, SamplingParams, SyncStats, mix_seed
from tidal.weight_sync import WeightHandle

log = logging.getLogger(__name__)

CONCURRENCY_GROUPS = {"control": 1, "queue": 4}
"""Ray concurrency groups of the worker actor beside generation: weight offers, one at a time; and
the queue (submissions, evaluation requests that wait for their turn, stop)."""


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
    """Longest wait for weights (`ray.stall_timeout_s`)."""

    @classmethod
    def of(cls, cfg: RunConfig) -> WorkerConfig:
        return cls(
            cfg.model,
            cfg.data,
            cfg.rollout,
            cfg.rewards,
            cfg.envs,
            cfg.eval,
            cfg.weight_sync,
            cfg.seed,
            cfg.ray.stall_timeout_s,
        )


def sampling_params(r: RolloutConfig, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop=list(r.stop),
        seed=seed,
        ignore_eos=r.ignore_eos,
    )


class RolloutWorker:
    def __init__(self, cfg: WorkerConfig, model_dir: str, index: int = 0, buffer: Any = None) -> None:
        """`buffer`: the buffer actor to put groups into, or its name; a name is looked up here, so a
        restarted worker finds the buffer again (see `tidal.stages.train._start_workers`)."""
        torch.set_num_threads(max(1, math.ceil(cfg.rollout.num_cpus_per_worker)))
        self.cfg = cfg
        self.index = index
        self.buffer = ray.get_actor(buffer) if isinstance(buffer, str) else buffer
        self.engine = build_engine(cfg.model, cfg.rollout, model_dir, seed=mix_seed(cfg.seed, index))
        self._forward_model = own_forward(self.engine)  # for the held-out log-prob check
        self.envs = build_runtimes(cfg.envs, cfg.rewards, cfg.data)
        name = cfg.model.preset or Path(str(cfg.model.path)).name
        self.agents = attach_agents(self.envs, self.engine, cfg.rollout, name, index)
        self._exact = cfg.rollout.deterministic
        self.weights = WeightStage(self.engine, cfg.weight_sync, index, self._exact, cfg.timeout_s)
        self._last_end = time.perf_counter()
        self._queue = WorkQueue()
        self._serving = False
        self._engine_lock = threading.Lock()
        """Held while the engine generates or evaluates: an evaluation called before the serving loop
        started never runs beside it."""
        self._scoring = ThreadPoolExecutor(1, thread_name_prefix="tidal-score")
        self._scored: list[Future[None]] = []
        self._ended: list[tuple[Work, list[Sample], Metrics]] = []  # groups ended, to score and put
        self._ended_lock = threading.Lock()
        self._calls = 0  # streaming generate calls so far (each seeded by its index)

    @property
    def version(self) -> int:
        return self.engine.version

    # ------------------------------------------------------------------------- control thread

    @ray.method(concurrency_group="control")
    def join_weight_sync(self, group: tuple[str, int, int] | None) -> None:
        """Build this worker's receiving end (for `broadcast`: join the trainer's group as rank index + 1)."""
        self.weights.join(group)

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """This process's id: a restart checks it reached the new process."""
        return os.getpid()

    @ray.method(concurrency_group="queue")
    def leave_weight_sync(self) -> None:
        """Give up the broadcast group for a new one (a member died): a receive in progress, which
        would wait for the dead member, ends at once. In the queue group, beside the receive."""
        self.weights.leave()

    @ray.method(concurrency_group="control")
    def offer_weights(self, handle: WeightHandle) -> SyncStats | None:
        """Receive a published snapshot and stage it for the generation thread (`WeightStage.offer`)."""
        return self.weights.offer(handle)

    # ---------------------------------------------------------------------- generation thread

    def rollout(self, prompts: list[Prompt], seed: int, batch_id: int = 0, min_version: int = 0) -> RolloutResult:
        """Generate and score one group per prompt with weights of version >= `min_version`.

        Puts the groups into the buffer under `batch_id` when one is attached (and then returns no
        groups), else returns them. Metrics are this call's.
        """
        t0 = time.perf_counter()
        idle = t0 - self._last_end
        weight_wait = self.weights.wait_for(min_version)
        t_gen0, start = time.perf_counter(), time.time()
        samples = self._generate(prompts, seed)
        t_gen = time.perf_counter() - t_gen0
        metrics = score_samples(self.envs, samples)
        by_group: dict[int, list[Sample]] = {p.group_id: [] for p in prompts}
        for s in samples:
            by_group[s.group_id].append(s)
        groups = [Group(gid, group) for gid, group in by_group.items()]
        metrics.update(sample_metrics(samples))
        metrics.update(self._call_metrics(idle, weight_wait))
        metrics.update(generate_timing(start, t_gen))
        if self.buffer is not None:
            self._put([_slim(g) for g in groups], batch_id, metrics)
            groups = []
        metrics["perf/rollout_time_s"] = largest(time.perf_counter() - t0)
        self._last_end = time.perf_counter()
        return RolloutResult(groups, metrics)

    def _call_metrics(self, idle: float, weight_wait: float) -> Metrics:
        return {
            "async/worker_version": smallest(float(self.version)),  # the furthest behind
            "async/worker_idle_s": largest(idle),
            "async/worker_weight_wait_s": largest(weight_wait),
            # Snapshots in host memory beside the engine's weights: 1 at most, unless deterministic.
            "async/worker_snapshots_held": largest(float(self.weights.take_most_held())),
        }

    # ------------------------------------------------------------------------------ serving

    @ray.method(concurrency_group="queue")
    def submit(self, work: Work) -> None:
        """Queue `work` for the serving loop."""
        self._queue.put(work)

    @ray.method(concurrency_group="queue")
    def stop(self) -> None:
        """End the serving loop after its current generate call; queued work is dropped (the buffer's
        ledger counts it in flight)."""
        for item in self._queue.close():
            if isinstance(item, EvalRequest):
                item.error = RuntimeError(f"rollout worker {self.index} stopped before evaluating")
                item.done.set()

    def serve(self) -> None:
        """Generate queued work until `stop` (the driver's long-lived call on the generation thread)."""
        self._serving = True
        try:
            while items := self._queue.take(max(1, self.cfg.rollout.batch_size // self.cfg.rollout.group_size)):
                self._raise_scoring_errors()
                head = items[0]
                with self._engine_lock:
                    if isinstance(head, EvalRequest):
                        self._run_eval(head)
                    elif head.fixed:
                        self._flush_scoring()
                        self.rollout(head.prompts, head.seed, head.batch_id, head.min_version)
                    else:
                        self._stream([w for w in items if isinstance(w, Work)])
            self._flush_scoring()
        except BaseException:
            self._settle_scoring()
            raise
        finally:
            self._serving = False
            self.stop()

    def _stream(self, works: list[Work]) -> None:
        """Generate the queued groups `works` in one call per env; each group is scored and put into
        the buffer on the scoring thread the moment its last sample ends."""
        r = self.cfg.rollout
        t0 = time.perf_counter()
        idle = t0 - self._last_end
        weight_wait = self.weights.wait_for(max(w.min_version for w in works))
        waiting = {w.prompts[0].group_id: (w, []) for w in works}
        first = [self._call_metrics(idle, weight_wait)]  # goes with the call's first group

        def on_sample(s: Sample) -> None:
            work, samples = waiting[s.group_id]
            samples.append(s)
            if sum(x.episode_end for x in samples) == r.group_size:  # (an agent's episode may split)
                self._put_group(work, waiting.pop(s.group_id)[1], first.pop() if first else {})

        def admit(label: str, running: int) -> list[Prompt]:
            # More queued groups of this env join the call while rows are free, unless they need newer
            # weights or newer ones wait to be loaded between calls (with interruptible, at chunks).
            staged = self.weights.pending() and not r.interruptible
            more = [] if staged else self._queue.take_now((r.batch_size - running) // r.group_size, label, self.version)
            for w in more:
                waiting[w.prompts[0].group_id] = (w, [])
            return [w.prompts[0] for w in more]

        t_gen0, start = time.perf_counter(), time.time()
        on_chunk = self._at_chunk_boundary if r.interruptible else None
        for label, prompts in group_by_env([w.prompts[0] for w in works]).items():
            params = sampling_params(r, mix_seed(mix_seed(self.cfg.seed, self.index), self._calls))
            self._calls += 1
            generate_samples(
                self.envs[label],
                self.engine,
                prompts,
                r.group_size,
                params,
                r,
                on_chunk=on_chunk,
                between_generations=self.weights.apply,
                on_sample=on_sample,
                admit=partial(admit, label),
            )
        t_gen = time.perf_counter() - t_gen0
        for work, samples in list(waiting.values()):  # groups short of samples (a prompt its env could not make)
            self._put_group(work, samples, first.pop() if first else {})
        timing = generate_timing(start, t_gen)
        self._scored.append(self._scoring.submit(self._put, [], works[0].batch_id, timing))
        self._last_end = time.perf_counter()

    def _put_group(self, work: Work, samples: list[Sample], extra: Metrics) -> None:
        with self._ended_lock:
            self._ended.append((work, samples, extra))
        self._scored.append(self._scoring.submit(self._score_and_put))

    def _score_and_put(self) -> None:
        """Score every group that ended since the last call and put them, one buffer call per batch
        (groups that end together, as short answers do, travel together)."""
        with self._ended_lock:
            ended, self._ended = self._ended, []
        by_batch: dict[int, list[tuple[Work, list[Sample], Metrics]]] = {}
        for item in ended:
            by_batch.setdefault(item[0].batch_id, []).append(item)
        for batch_id, items in by_batch.items():
            samples = [s for _, group, _ in items for s in group]
            metrics = merge(
                [
                    score_samples(self.envs, samples) if samples else {},
                    sample_metrics(samples),
                    *(extra for _, _, extra in items),
                ]
            )
            if samples:  # the weights they were generated with (the oldest token's)
                metrics["async/worker_version"] = smallest(float(min(s.version for s in samples)))
            groups = [_slim(Group(work.prompts[0].group_id, group)) for work, group, _ in items]
            self._put(groups, batch_id, metrics)

    def _put(self, groups: list[Group], batch_id: int, metrics: Metrics) -> None:
        if self.buffer is None:
            raise RuntimeError("a serving rollout worker needs a buffer to put its groups into")
        try:
            ray.get(self.buffer.put.remote(groups, batch_id, metrics, self.index), timeout=self.cfg.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"rollout worker {self.index}: the buffer did not take its groups within "
                f"ray.stall_timeout_s={self.cfg.timeout_s:g}s"
            ) from None

    def _raise_scoring_errors(self) -> None:
        for f in [f for f in self._scored if f.done()]:
            self._scored.remove(f)
            f.result()

    def _flush_scoring(self) -> None:
        while self._scored:
            self._scored.pop(0).result()

    def _settle_scoring(self) -> None:
        """The serving loop failed: every group that ended is scored and put before the failure
        reaches the driver, which then hands out again only the groups that did not land (none is
        put behind its back, and trained twice). A scoring error meanwhile is logged: the loop's
        own error is the one reported."""
        scored, self._scored = self._scored, []
        for f in scored:
            if (e := f.exception()) is not None:
                log.warning(
                    "rollout worker %d: a group could not be scored and put after the failure: %r", self.index, e
                )

    def _run_eval(self, request: EvalRequest) -> None:
        self._flush_scoring()  # the reward scorers then serve the evaluation alone
        try:
            request.result = self._evaluate(request.prompts, request.min_version)
        except BaseException as e:
            request.error = e
            raise
        finally:
            request.done.set()

    def _generate(self, prompts: list[Prompt], seed: int) -> list[Sample]:
        """`group_size` unscored samples per prompt, env by env; newer weights are applied before
        every generate call, and inside them with `rollout.interruptible`."""
        r = self.cfg.rollout
        on_chunk = self._at_chunk_boundary if r.interruptible else None
        samples: list[Sample] = []
        for k, (label, group) in enumerate(group_by_env(prompts).items()):
            params = sampling_params(r, mix_seed(seed, k))
            samples += generate_samples(
                self.envs[label],
                self.engine,
                group,
                r.group_size,
                params,
                r,
                between_generations=self.weights.apply,
                on_chunk=on_chunk,
            )
        return samples

    def _at_chunk_boundary(self) -> None:
        """Interruptible generation's hook inside a generate call: newer weights go in between chunks."""
        self.weights.apply()

    def load_weights(self, snapshot: tuple[dict[str, torch.Tensor], int]) -> int:
        """Load a (state dict, version) snapshot now (in-process use); returns the version held."""
        self.weights.load_now(*snapshot)
        return self.version

    @ray.method(concurrency_group="queue")
    def evaluate(self, prompts: list[Prompt], min_version: int = 0) -> Metrics:
        """Greedy held-out metrics with weights of version >= `min_version`, scored by each env (the
        run's rewards without `envs`) exactly as in training. While the worker serves, the request
        goes first in its queue and runs between two generate calls."""
        if not self._serving:  # (a serving loop about to start waits for the engine)
            with self._engine_lock:
                return self._evaluate(prompts, min_version)
        request = EvalRequest(prompts, min_version)
        # First in the queue; in deterministic mode in its turn, since each batch before it needs the
        # older weights it was dispatched for.
        (self._queue.put if self._exact else self._queue.put_first)(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _evaluate(self, prompts: list[Prompt], min_version: int) -> Metrics:
        self.weights.wait_for(min_version)
        out, _ = evaluate(self.engine, self.envs, prompts, self.cfg.eval, self.cfg.rollout, self._forward_model)
        return {**out, "eval/version": largest(float(self.version))}


def generate_timing(start: float, seconds: float) -> Metrics:
    """A generate call's wall time, from `start` (a `time.time()`) for `seconds`. Merged over a step,
    `perf/generate_time_s` is the time during which at least one worker was generating: a worker's
    calls add up, workers generating side by side count their common time once."""
    return {"perf/generate_time_s": busy(start, seconds)}


def sample_metrics(samples: list[Sample]) -> Metrics:
    """Length, truncation and token counts of a rollout call's (or a group's) samples."""
    n = float(len(samples))
    lengths = [len(s.response_ids) for s in samples]
    return {
        "rollout/response_length": mean(sum(lengths) / max(n, 1.0), n),
        **(
            {
                "rollout/response_length_max": largest(float(max(lengths))),
                "rollout/response_length_min": smallest(float(min(lengths))),
            }
            if lengths
            else {}
        ),
        "rollout/truncated_frac": mean(sum(s.finish_reason == "length" for s in samples) / max(n, 1.0), n),
        "rollout/samples": total(n),
        "rollout/interrupted_samples": total(float(sum(len(set(s.versions)) > 1 for s in samples))),
        "perf/rollout_tokens": total(float(sum(sum(s.loss_mask) for s in samples))),
    }


def _slim(g: Group) -> Group:
    """The group as the buffer holds it: training fields only."""
    return Group(g.group_id, [s.for_training() for s in g.samples])


def build_engine(model: ModelConfig, rollout: RolloutConfig, model_dir: str, seed: int = 0) -> Engine:
    """The rollout engine `rollout.engine` names, over the policy in `model_dir`, at version 0."""
    if rollout.engine == "vllm":
        from tidal.rollout.engines.vllm import VLLMEngine

        tok = load_tokenizer(model_dir)
        return VLLMEngine(model_dir, tok, rollout.vllm, dtype=model.dtype, seed=seed, lora=model.lora)
    dtype = torch.bfloat16 if model.dtype == "bfloat16" else torch.float32
    policy = load_model(model_dir, dtype, model.attn_implementation)
    if model.lora is not None and model.lora.publish == "adapters":
        # The trainer publishes its adapters alone: the engine runs the same ones over its base.
        policy = apply_lora(policy, model.lora)
    if rollout.num_gpus_per_worker > 0 and torch.cuda.is_available():
        policy.to("cuda")  # Ray made the worker's GPU the only visible one
    return TransformersEngine(policy, load_tokenizer(model_dir), version=0)
