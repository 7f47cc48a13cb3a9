"""The Trainer actor: pulls groups from the buffer, takes RL steps with DeepSpeed, publishes weights.

A plain class the driver turns into Ray actors (`tidal.trainer.group.TrainerGroup`), one per rank
of the DeepSpeed world. One `step()` is one rollout batch: advantages, the proximal log-probs
recomputed with the weights held before the update (the reference's, with a KL penalty, and the
teacher's, with on-policy distillation, whose signal joins the advantages per token), then
`algorithm.minibatches` optimizer steps. With one minibatch the update's own forward runs on those
weights, so its detached log-probs are pi_old and the separate recompute is skipped
(`algorithm.recompute_pi_old`).

With several ranks every call of the driver's but the weight-sync setup and the ledger reaches all
of them. Rank 0 takes the batch from the buffer and broadcasts it; every rank builds the whole
batch (advantages are per group), recomputes log-probs on its share of the rows and all-gathers
them, so the off-policy statistics and the M2PO mask are those of the whole batch, then trains
its share of each minibatch against the whole minibatch's loss denominator. Publishing gathers the
weights on every rank and rank 0 sends them, bucket by bucket.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tidal import checkpoint
from tidal.config import (
    AlgorithmConfig,
    BehaviorCorrection,
    M2POTrustRegion,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    TrainerConfig,
    WeightSyncConfig,
)
from tidal.model.batching import Micro, scatter_rows, split_parts
from tidal.model.forward import batch_logprobs, logp_mismatch
from tidal.model.loading import load_tokenizer, resolve_model_dir
from tidal.model.lora import apply_lora, save_adapter
from tidal.model.routing import (
    RoutingRecorder,
    biased_routers,
    expert_load,
    replay_recorded,
    routing_health,
    update_router_bias,
)
from tidal.runtime import RunError
from tidal.telemetry.metrics import Metrics, PeakRSS, largest, mean, merge, total
from tidal.trainer.distill import distill_advantages
from tidal.trainer.engine import DeepSpeedTrainer
from tidal.trainer.group import RankInfo
from tidal.trainer.offpolicy import m2po_mask, offpolicy_stats
from tidal.trainer.prepare import load_for_training, load_reference
from tidal.trainer.rl import RLLoss, build_batch, loss_denominator
from tidal.types import CheckpointShard, Group, StepResult, TrainBatch
from tidal.weight_sync import (
    BroadcastPublisher,
    WeightHandle,
    WeightPublisher,
    buckets,
    make_publisher,
    sync_group_address,
)


@dataclass(frozen=True)
class TrainerActorConfig:
    """The config sections the trainer actor uses."""

    model: ModelConfig
    trainer: TrainerConfig
    algorithm: AlgorithmConfig
    rollout: RolloutConfig
    """Its sampling temperature, `max_new_tokens` and `max_staleness`."""
    weight_sync: WeightSyncConfig
    steps: int
    """Rollout batches of the run (`train.steps`), for the lr schedule's length."""
    seed: int
    timeout_s: float
    """Longest wait on the buffer (`ray.stall_timeout_s`)."""
    weights_dir: Path
    """Where the `disk` transport writes snapshots by default."""

    @classmethod
    def of(cls, cfg: RunConfig) -> TrainerActorConfig:
        return cls(
            cfg.model,
            cfg.trainer,
            cfg.algorithm,
            cfg.rollout,
            cfg.weight_sync,
            cfg.train.steps,
            cfg.seed,
            cfg.ray.stall_timeout_s,
            cfg.run_dir / "weights",
        )


class TrainerActor:
    def __init__(
        self, cfg: TrainerActorConfig, model_dir: str, buffer: Any = None, rank: RankInfo | None = None
    ) -> None:
        torch.set_num_threads(max(1, math.ceil(cfg.trainer.num_cpus)))
        if rank is not None:  # one of several ranks: DeepSpeed joins their world through env://
            os.environ.update(rank.environ())
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.model_dir = model_dir
        self.buffer = buffer
        self.tokenizer = load_tokenizer(model_dir)
        steps = cfg.steps * cfg.algorithm.minibatches
        attn = cfg.model.attn_implementation
        model = load_for_training(model_dir, cfg.trainer, attn_implementation=attn)
        if cfg.model.lora is not None:
            model = apply_lora(model, cfg.model.lora)
        self.trainer = DeepSpeedTrainer(model, cfg.trainer, total_steps=steps)
        # The reference is the frozen initial policy, loaded only when the KL penalty is on; under LoRA
        # it is the policy's own frozen base with the adapters switched off (no second copy).
        self.ref = None
        if cfg.algorithm.loss.kl.coef > 0 and cfg.model.lora is None:
            self.ref = load_reference(model_dir, cfg.trainer, self.trainer.engine.device, attn)
        # The distillation teacher: frozen, held and partitioned as the reference is.
        self.teacher = None
        if cfg.algorithm.distill is not None:
            teacher_dir = resolve_model_dir(cfg.algorithm.distill.teacher_model())
            self.teacher = load_reference(teacher_dir, cfg.trainer, self.trainer.engine.device, attn)
        self.replay = cfg.algorithm.routing_replay
        self.bias_rate = cfg.algorithm.loss.router_bias_update_rate
        if self.bias_rate > 0 and not biased_routers(self.trainer.module):
            raise ValueError(
                "algorithm.loss.router_bias_update_rate needs MoE routers with a correction bias "
                f"(GLM-4.5, GLM-5); {type(self.trainer.module).__name__} has none"
            )
        self.loss = RLLoss(cfg.algorithm.loss, cfg.rollout.temperature, cfg.rollout.max_new_tokens)
        self.publisher: WeightPublisher | None = None
        self.trained_groups: list[int] = []
        """Group ids trained on, in order (a group trained twice would show here twice)."""
        self._last_end = time.perf_counter()

    @property
    def version(self) -> int:
        return self.trainer.version

    def step(self, groups: list[Group] | None = None, batch_id: int = 0) -> StepResult:
        """One rollout batch: `groups`, or batch `batch_id` taken from the buffer."""
        t0 = time.perf_counter()
        idle = t0 - self._last_end
        if groups is None:
            groups = self._take(batch_id)
        try:
            metrics = self._train(groups) if groups else {"train/skipped_steps": total(1.0)}
        finally:
            self._last_end = time.perf_counter()
        metrics["async/trainer_idle_s"] = total(idle)
        trained = [
            {
                "id": g.group_id,
                "batch": g.batch_id,
                "worker": g.worker,
                "versions": sorted({v for s in g.samples for v in s.versions}),
            }
            for g in groups
        ]
        return StepResult(self.version, bool(groups), metrics, trained)

    def _take(self, batch_id: int) -> list[Group]:
        """Batch `batch_id` from the buffer on rank 0, broadcast to the other ranks. A failure on rank
        0 is broadcast too, so that every rank raises instead of the others waiting for a batch."""
        taken: tuple[list[Group] | None, str] = (None, "")
        if self.trainer.rank == 0:
            import ray

            try:
                taken = (ray.get(self.buffer.take.remote(batch_id, self.version), timeout=self.cfg.timeout_s), "")
            except Exception as e:
                self.trainer.broadcast_object((None, f"{type(e).__name__}: {e}"))
                raise
        groups, error = self.trainer.broadcast_object(taken)
        if groups is None:
            raise RuntimeError(f"trainer rank 0 could not take batch {batch_id}: {error}")
        return groups

    def _logprobs(
        self,
        model: torch.nn.Module,
        batch: TrainBatch,
        replay: bool = False,
        plan: list[Micro] | None = None,
        adapters_off: bool = False,
    ) -> torch.Tensor:
        """(B, T) log-probs of the whole batch: each rank computes its share of the rows (in the
        micro-batches `plan` of its share, by default `DeepSpeedTrainer.plan`'s), then all gather;
        with `replay`, routed as generation routed (R3); with `adapters_off`, by LoRA's frozen base."""
        around = partial(replay_recorded, model) if replay else None
        if adapters_off:
            around = lambda _micro: model.disable_adapter()  # noqa: E731 (peft's context manager)
        shard = self.trainer.shard(batch)
        plan = plan if plan is not None else self.trainer.plan(shard)  # every rank as many forwards (ZeRO-3)
        size, temperature = self.cfg.trainer.micro_batch_size, self.cfg.rollout.temperature
        local = batch_logprobs(model, shard, temperature, size, around, plan)
        return self.trainer.gather_rows(local, batch.input_ids.shape[0])

    def _recompute_pi_old(self, batch: TrainBatch) -> None:
        """The policy's log-probs as pi_old's (`batch.logp_old`): routed as generation routed with
        R3; with R2, the routing these forwards take becomes `batch.routing`, for the update."""
        model = self.trainer.module
        if self.replay != "r2":
            batch.logp_old = self._logprobs(model, batch, replay=self.replay == "r3")
            return
        shard = self.trainer.shard(batch)
        plan = self.trainer.plan(shard)
        with RoutingRecorder(model) as recorder:
            batch.logp_old = self._logprobs(model, batch, plan=plan)
            picked = recorder.take()  # this rank's tokens, micro-batch after micro-batch
        shapes = [m.batch.input_ids.shape for m in plan]
        parts = picked.split([rows * width for rows, width in shapes])
        parts = [part.view(*shape, *picked.shape[1:]) for part, shape in zip(parts, shapes, strict=True)]
        local = scatter_rows(parts, plan, *shard.input_ids.shape)
        batch.routing = self.trainer.gather_rows(local, batch.input_ids.shape[0])

    def _train(self, groups: list[Group]) -> Metrics:
        """One rollout batch: its advantages, pi_old (recomputed, or the update's own forward's), the
        M2PO mask and the reference's log-probs as the step's plan asks, then the optimizer steps."""
        t0 = time.perf_counter()
        self.trained_groups += [g.group_id for g in groups]
        batch, metrics = build_batch(groups, self.cfg.algorithm.advantage, self.tokenizer.pad_token_id)
        metrics.update(_staleness(self.version, groups, batch, self.cfg.rollout.max_staleness))
        if batch.routing is not None:  # before the update: the routing of the weights pi_old is
            shard = self.trainer.shard(batch)
            health = routing_health(self.trainer.module, shard, self.trainer.plan(shard))
            metrics.update(self.trainer.all_reduce(health))
        plan = self._plan()
        tokens, version = float(batch.loss_mask.sum()), self.version  # pi_old's version
        t_prep = time.perf_counter()
        if plan.recompute_pi_old:
            self._recompute_pi_old(batch)
            metrics.update(self._pi_old_metrics(batch, tokens, version))
        if plan.m2po_threshold is not None:
            # Before any optimizer step pi_theta = pi_old, so log(pi_old / mu) is the paper's log ratio;
            # the mask covers the whole rollout batch (every rank builds the same one from the gathered
            # pi_old) and every minibatch reuses its rows.
            assert batch.logp_old is not None  # the config rejects m2po with the behavior correction
            batch.m2po_keep, m2po_metrics = m2po_mask(
                batch.logp_old, batch.logp_mu, batch.loss_mask, plan.m2po_threshold
            )
            metrics.update(m2po_metrics)
        if self.ref is not None:
            batch.logp_ref = self._logprobs(self.ref, batch)
        elif self.cfg.algorithm.loss.kl.coef > 0:  # LoRA: the base, adapters off
            batch.logp_ref = self._logprobs(self.trainer.module, batch, adapters_off=True)
        if self.teacher is not None:
            metrics.update(self._distill(batch))
        t_recompute = time.perf_counter()
        loss = self.loss.for_step(replay=plan.replay, collect_pi_old=plan.reuse_pi_old)
        steps = self._update(batch, loss, metrics)
        if plan.reuse_pi_old:
            rows, width = self.trainer.shard(batch).input_ids.shape  # this rank's, as the update took them
            local = loss.take_pi_old(self.trainer.micros, rows, width)
            batch.logp_old = self.trainer.gather_rows(local, batch.input_ids.shape[0])
            metrics.update(self._pi_old_metrics(batch, tokens, version))
            metrics["perf/recompute_skipped"] = total(1.0)
        t_end = time.perf_counter()
        # The loss's metrics carry their namespace (train/, offpolicy/, moe/); the trainer's do not.
        metrics.update({k if "/" in k else f"train/{k}": v for k, v in merge(steps).items()})
        metrics.update(
            {
                "train/samples": total(float(batch.input_ids.shape[0])),
                "train/groups": total(float(len(groups))),
                "perf/train_tokens": total(tokens),
                "perf/train_tokens_per_s": mean(tokens / max(t_end - t_recompute, 1e-9)),
                "perf/recompute_time_s": total(t_recompute - t_prep),
                "perf/train_time_s": total(t_end - t0),
            }
        )
        return metrics

    def _distill(self, batch: TrainBatch) -> Metrics:
        """The teacher's log-probs of the batch's sampled tokens (in the micro-batches of the policy's
        own recompute, each rank its share), and its signal added to `batch.advantages` per token
        (`tidal.trainer.distill`), before the batch is split into minibatches."""
        assert self.teacher is not None and self.cfg.algorithm.distill is not None
        t0 = time.perf_counter()
        d = self.cfg.algorithm.distill
        logp_teacher = self._logprobs(self.teacher, batch)
        batch.advantages, metrics = distill_advantages(
            batch.advantages, logp_teacher, batch.logp_mu, batch.loss_mask, d.coef, d.reward_coef
        )
        metrics["perf/teacher_time_s"] = total(time.perf_counter() - t0)
        return metrics

    def _plan(self) -> StepPlan:
        """What this run's steps do besides the update, from the config (see `StepPlan`)."""
        loss_cfg = self.cfg.algorithm.loss
        needs_pi_old = not isinstance(loss_cfg.correction, BehaviorCorrection)
        reuse = needs_pi_old and self._update_gives_pi_old()
        m2po = loss_cfg.trust_region.threshold if isinstance(loss_cfg.trust_region, M2POTrustRegion) else None
        return StepPlan(
            recompute_pi_old=needs_pi_old and not reuse,
            reuse_pi_old=reuse,
            # R3 replays generation's routing in every forward. R2 replays pi_old's in the update: where
            # the update's forward is pi_old's (`reuse`), it routes that way by itself.
            replay=self.replay == "r3" or (self.replay == "r2" and not reuse),
            m2po_threshold=m2po,
        )

    def _update(self, batch: TrainBatch, loss: RLLoss, metrics: Metrics) -> list[Metrics]:
        """`algorithm.minibatches` optimizer steps over `batch`, each rank on its share, with `loss`; a
        bias update of GLM's routers from the step's expert load when configured (into `metrics`)."""
        cfg = self.cfg
        steps = []
        with RoutingRecorder(self.trainer.module) if self.bias_rate else contextlib.nullcontext() as recorder:
            for minibatch in split_parts(batch, cfg.algorithm.minibatches):
                norm = loss_denominator(minibatch, cfg.algorithm.loss, cfg.rollout.max_new_tokens)
                shard = self.trainer.shard(minibatch)
                around = partial(loss.around, self.trainer.module)
                steps.append(self.trainer.train_step(shard, loss_fn=loss, normalizer=norm, around=around))
        if recorder is not None:  # the step's expert load, over every rank, steers the biases
            load = self.trainer.sum_over_ranks(expert_load(recorder.take(), recorder.num_experts))
            metrics.update(update_router_bias(self.trainer.module, load, self.bias_rate))
        return steps

    def _update_gives_pi_old(self) -> bool:
        """Whether the update's own forward runs on pi_old's weights, so that a separate recompute is
        redundant (`algorithm.recompute_pi_old: auto`): one optimizer step per rollout batch, and no
        M2PO mask, which needs pi_old for the whole batch before the update."""
        a = self.cfg.algorithm
        return (
            a.recompute_pi_old == "auto" and a.minibatches == 1 and not isinstance(a.loss.trust_region, M2POTrustRegion)
        )

    @staticmethod
    def _pi_old_metrics(batch: TrainBatch, tokens: float, version: int) -> Metrics:
        """Train / inference mismatch and off-policy statistics of pi_old (at trainer `version`) against
        the behavior log-probs."""
        assert batch.logp_old is not None
        metrics: Metrics = {}
        gap = logp_mismatch(batch.logp_mu, batch.logp_old, batch.loss_mask)
        if gap:
            metrics["rollout/logp_mismatch_mean"] = mean(gap["logp_mismatch_mean"], tokens)
            metrics["rollout/logp_mismatch_max"] = largest(gap["logp_mismatch_max"])
        metrics.update(offpolicy_stats(batch.logp_old, batch.logp_mu, batch.loss_mask, version - batch.versions))
        return metrics

    def weight_sync_group(self, num_workers: int) -> tuple[str, int, int] | None:
        """(address, port, world size) of the weight-sync group the workers join (`broadcast` only)."""
        if self.cfg.weight_sync.transport.type != "broadcast":
            return None
        return (*sync_group_address(), num_workers + 1)

    def reform_weight_sync(self, num_workers: int) -> tuple[str, int, int] | None:
        """Give up the broadcast group (a worker died; the send in progress ends) and return a new
        one's address, for every member to join again."""
        if isinstance(self.publisher, BroadcastPublisher):
            self.publisher.abandon()
        return self.weight_sync_group(num_workers)

    def join_weight_sync(self, group: tuple[str, int, int] | None) -> None:
        """Build the publishing end; with `broadcast` this blocks until every worker has joined."""
        self.publisher = make_publisher(self.cfg.weight_sync, self.cfg.weights_dir, group)

    def publish(self) -> tuple[WeightHandle | None, Metrics]:
        """Publish the current policy for the workers without waiting for them: (handle, metrics) on
        rank 0, (None, {}) on the others. Collective: every rank takes part in gathering the weights."""
        t0 = time.perf_counter()
        if self.trainer.rank != 0:
            for _ in self._published(None):
                pass
            self._last_end = time.perf_counter()
            return None, {}
        if self.publisher is None:
            self.join_weight_sync(None)
        assert self.publisher is not None
        with PeakRSS() as peak:
            handle = self.publisher.publish(self.rollout_weights(), self.version)
        self._last_end = time.perf_counter()
        metrics = {
            "perf/publish_time_s": total(self._last_end - t0),
            "async/published_version": largest(float(self.version)),
            "perf/publish_mb": largest(handle.nbytes / 2**20),
        }
        if peak.growth is not None:
            metrics["perf/publish_peak_mem_mb"] = largest(peak.growth / 2**20)
        return handle, metrics

    def ledger(self) -> dict[str, int]:
        """Groups trained on, and how many distinct ones (equal unless a group was trained twice)."""
        return {"trained_groups": len(self.trained_groups), "unique_trained_groups": len(set(self.trained_groups))}

    def rollout_weights(self) -> Iterator[dict[str, torch.Tensor]]:
        """The policy as the rollout model holds it, as a stream of partial state dicts (buckets of at
        most `weight_sync.bucket_mb`, a larger tensor alone), gathered and cast tensor by tensor:
        no full copy of the model is built. The fp32 master weights are cast to `model.dtype`, so a
        bf16 rollout model gets bf16 weights, half the bytes to send; the cast rounds to nearest even
        exactly as the worker's own copy into its bf16 parameters would. Collective (see publish)."""
        dtype = torch.bfloat16 if self.cfg.model.dtype == "bfloat16" else None
        yield from buckets(self._published(dtype), int(self.cfg.weight_sync.bucket_mb * 2**20))

    def _published(self, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """What a publish sends, tensor by tensor: the adapters alone with `model.lora.publish:
        adapters`, else the (merged) model. Collective."""
        lora = self.cfg.model.lora
        if lora is not None and lora.publish == "adapters":
            return self.trainer.iter_adapters(dtype)
        return self.trainer.iter_export(dtype)

    def snapshot(self) -> tuple[dict[str, torch.Tensor], int]:
        """(the state dict published to the workers, version) of the current policy, in-process."""
        return {k: v for bucket in self.rollout_weights() for k, v in bucket.items()}, self.version

    def save_state(self, path: str) -> CheckpointShard:
        """Write this rank's part of a DeepSpeed checkpoint (parameters, optimizer, lr scheduler,
        ZeRO partitions) with the groups trained and the RNG state. Collective. Returns the files this
        rank sees in `path` once written (DeepSpeed's save ends with a barrier, so every rank's are
        written by then), for the driver to find in its own view before it seals the checkpoint."""
        t0 = time.perf_counter()
        client = {"trained_groups": self.trained_groups, "rng": torch.get_rng_state()}
        self.trainer.engine.save_checkpoint(path, tag="trainer", client_state=client, save_latest=False)
        files = checkpoint.listing(Path(path))
        self._last_end = time.perf_counter()  # not trainer idle time
        return CheckpointShard(self.trainer.rank, files, self._last_end - t0)

    def load_state(self, path: str) -> int:
        """Continue from `save_state`'s checkpoint in `path`; the version it holds. Collective. First
        every rank checks that it sees the files the checkpoint's manifest lists, at their sizes (on a
        node that does not share output_dir it does not), and all ranks fail together, in one line
        naming each rank's missing files, before any of them starts DeepSpeed's collective load."""
        mine = checkpoint.shard_problem(Path(path), self.trainer.rank)
        problems: list[str | None] = [mine]
        if self.trainer.world_size > 1:
            problems = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(problems, mine)
        if any(problems):
            raise RunError(f"cannot resume: {'; '.join(p for p in problems if p)}; {checkpoint.SHARED}")
        loaded, client = self.trainer.engine.load_checkpoint(path, tag="trainer")
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no trainer checkpoint in {path}")
        self.trained_groups = client["trained_groups"]
        torch.set_rng_state(client["rng"])
        return self.version

    def save(self, out_dir: str, merged: bool = True) -> str:
        """The policy as a Hugging Face checkpoint in the model's dtype (`model.dtype`: what rollout
        ran), sharded; the fp32 masters stay in the DeepSpeed checkpoints that resume a run. With
        LoRA, the adapter in peft's format under `adapter/` too (fp32), and the merged model only when
        `merged`. Collective."""
        dtype = torch.bfloat16 if self.cfg.model.dtype == "bfloat16" else torch.float32
        out = Path(out_dir)
        lora = self.cfg.model.lora
        if lora is not None:
            adapters = dict(self.trainer.iter_adapters())
            if self.trainer.rank == 0:
                save_adapter(out / "adapter", adapters, lora, self.model_dir)
            if not merged:
                if self.trainer.rank == 0:
                    self.tokenizer.save_pretrained(out)
                return str(out)
        return str(self.trainer.save_hf(out, self.tokenizer, dtype))


@dataclass(frozen=True)
class StepPlan:
    """What a step does besides the update, decided once from the config."""

    recompute_pi_old: bool
    """A forward of the weights held before the update gives pi_old's log-probs."""
    reuse_pi_old: bool
    """The update's own forward is pi_old's (one minibatch, `recompute_pi_old: auto`): its detached
    log-probs are kept instead of a recompute."""
    replay: bool
    """The update's forwards route as recorded (R3: generation's routing; R2: pi_old's)."""
    m2po_threshold: float | None
    """M2PO's mask over the whole batch before the update, at this threshold; None: no mask."""


def _staleness(version: int, groups: list[Group], batch: TrainBatch, max_staleness: int) -> Metrics:
    """Staleness at the start of the update: per sample (trainer version minus the sample's oldest
    token version) the mean, max and a histogram as the fraction of samples of each age
    0..max_staleness (older ones never get here); per token the mean, which is lower with
    interruptible generation, where later tokens of a sample come from newer weights."""
    ages = [version - s.version for g in groups for s in g.samples]
    token_ages = (version - batch.versions)[batch.loss_mask.bool()].float()
    n = float(len(ages))
    out = {
        "async/staleness_mean": mean(statistics.fmean(ages), n),
        "async/staleness_max": largest(float(max(ages))),
        "async/token_staleness_mean": mean(
            float(token_ages.mean()) if token_ages.numel() else 0.0, float(token_ages.numel())
        ),
    }
    out.update({f"async/staleness_frac_{a}": mean(sum(x == a for x in ages) / n, n) for a in range(max_staleness + 1)})
    return out
