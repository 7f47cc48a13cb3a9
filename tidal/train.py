"""`tidal train`: the RL driver. Builds the actors from the config and runs the loop.

Data flow (DESIGN.md): prompts -> RolloutWorker x N (generate + score groups) -> TrajectoryBuffer
(filter, staleness bound) -> Trainer (recompute log-probs, advantages, corrected policy loss,
optimizer step) -> weights published back to the workers, which pick them up between generations.
With `rollout.max_staleness: k > 0` the workers generate the next batches while the trainer trains;
with 0 the two take turns and every sample comes from the weights the trainer holds (on-policy).
"""

from __future__ import annotations

import json
import logging
import random
import time
from functools import partial
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from tidal.config import RewardsConfig, RunConfig, dump_config
from tidal.data import check_prompt_lengths, load_splits
from tidal.dispatch import Dispatcher, EvalTracker, SyncTracker, may_dispatch
from tidal.envs.base import Env
from tidal.envs.loading import env_label, resolve_envs
from tidal.metrics import largest, merge, values
from tidal.models import load_tokenizer
from tidal.monitor import Monitor
from tidal.rewards import resolve_rewards
from tidal.rollout.staleness import StalenessBound
from tidal.runtime import RunError, absolute_plugin_paths, actor_error_line, run_log, start_ray, wait_for
from tidal.trainer.group import TrainerGroup
from tidal.types import Prompt, StepResult
from tidal.warm_start import resolve_policy_dir, tokenizer_dir

log = logging.getLogger(__name__)


class PromptSampler:
    """Hands out prompts with unique group ids: each from an env drawn by weight, rows of an env in
    endless shuffled passes over its train split (every row once per pass)."""

    def __init__(self, sources: dict[str, tuple[Dataset, float]], seed: int) -> None:
        self.rows = {env: ds.to_list() for env, (ds, _) in sources.items()}
        self.envs = list(sources)
        self.weights = [w for _, w in sources.values()]
        self.rng = random.Random(seed)
        self.order: dict[str, list[int]] = {env: [] for env in self.envs}
        self.next_group_id = 0

    def take(self, n: int) -> list[Prompt]:
        out = []
        for _ in range(n):
            env = self.envs[0] if len(self.envs) == 1 else self.rng.choices(self.envs, self.weights)[0]
            if not self.order[env]:
                self.order[env] = list(range(len(self.rows[env])))
                self.rng.shuffle(self.order[env])
            out.append(Prompt(self.next_group_id, self.rows[env][self.order[env].pop()], env))
            self.next_group_id += 1
        return out


def load_env_splits(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase,
                    check_train: bool = True) -> tuple[PromptSampler, list[Prompt]]:  # fmt: skip
    """The prompt sampler over every env's train split, and the held-out prompts of every env. A
    prompt over `data.max_prompt_tokens` fails here, with its file and row, before any actor starts;
    `check_train=False` checks the held-out split only (`tidal eval`, which uses nothing else)."""
    envs = resolve_envs(cfg.envs) if cfg.envs else {"": Env()}
    specs = [(env_label(spec), spec.weight, spec.data or cfg.data) for spec in cfg.envs] or [("", 1.0, cfg.data)]
    sources, held_out = {}, []
    for label, weight, data in specs:
        train_ds, eval_ds = load_splits(data)
        eval_rows = eval_ds.to_list() if eval_ds is not None else []
        train_rows = train_ds.to_list() if check_train else []
        for split, rows in (("train", train_rows), ("eval", eval_rows)):
            check_prompt_lengths(tokenizer, [_prompt_text(envs[label], row) for row in rows], data, split)
        sources[label] = (train_ds, weight)
        held_out += [Prompt(-1, row, label) for row in eval_rows]
    return PromptSampler(sources, cfg.seed), held_out


def _prompt_text(env: Env, row: dict[str, Any]) -> str:
    try:
        return env.prompt(row)
    except Exception:  # the user's env: at run time its group is skipped and logged
        return ""


def run_train(cfg: RunConfig, worker_cls: type | None = None, trainer_cls: type | None = None) -> dict[str, Any]:
    """Train with RL; returns the summary (held-out accuracy before / after, ledger, wall time).

    `worker_cls` / `trainer_cls` replace the RolloutWorker / TrainerActor classes (benchmarks swap
    in calibrated sleeps while keeping the real actors, buffer and weight sync around them).
    """
    import ray

    from tidal.trainer.actor import TrainerActor, TrainerActorConfig

    t_start = time.time()
    split: dict[str, float] = {}  # where the run's wall time went (summary perf/*_s)
    cfg = absolute_plugin_paths(cfg.for_rl())
    _resolve_plugins(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    sampler, eval_rows = load_env_splits(cfg, load_tokenizer(tokenizer_dir(cfg.model)))
    t0 = time.time()
    model_dir, warm = resolve_policy_dir(cfg.model)
    split["perf/warm_start_s"] = time.time() - t0
    monitor = Monitor.for_run(cfg.monitor, run_dir, cfg.name, cfg.model_dump(mode="json"), cfg.train.steps)
    file_log = run_log(run_dir)
    t0 = time.time()
    start_ray(cfg, log_file=run_dir / "run.log")
    t_ray = time.time()
    split["perf/ray_start_s"] = t_ray - t0
    log.info("run %s: metrics, checkpoint and log (run.log, with the actors' output) in %s", cfg.name, run_dir)
    trainer = None
    try:
        buffer = _start_buffer(cfg)
        # The trainer's placement group first: packed ranks get whole nodes' GPUs before the workers
        # take theirs.
        trainer_args = (TrainerActorConfig.of(cfg), str(model_dir), buffer)
        trainer = TrainerGroup(trainer_cls or TrainerActor, cfg.trainer, trainer_args, cfg.ray.timeout_s)
        workers = _start_workers(cfg, str(model_dir), buffer, worker_cls)
        _join_weight_sync(cfg, trainer, workers)
        split["perf/actors_start_s"] = time.time() - t_ray
        summary = _loop(cfg, sampler, eval_rows, workers, buffer, trainer, monitor, warm)
        t0 = time.time()
        if cfg.train.save_checkpoint:
            saved = trainer.call("save", str(run_dir / "checkpoint"))
            summary["checkpoint"] = wait_for(saved, "checkpoint save", cfg.ray.timeout_s)[0]
        summary["perf/save_s"] = time.time() - t0
        summary["perf/wall_time_s"] = time.time() - t_start
        summary.update(split)
        monitor.log({k: v for k, v in summary.items() if isinstance(v, float)}, step=cfg.train.steps)
    except ray.exceptions.RayError as e:
        raise RunError(actor_error_line(e, logs=str(run_dir / "run.log"))) from None
    finally:
        if trainer is not None:
            trainer.close()
        ray.shutdown()
        monitor.close()
        logging.getLogger().removeHandler(file_log)
        file_log.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    before, after = summary.get("eval/accuracy_before", float("nan")), summary.get("eval/accuracy", float("nan"))
    saved = f"; checkpoint at {summary['checkpoint']}" if "checkpoint" in summary else ""
    held_out = f"held-out accuracy {before:.1%} -> {after:.1%}" if eval_rows else "no held-out data to evaluate"
    print(f"train done in {summary['perf/wall_time_s']:.0f}s ({_time_split(summary)}): {held_out}{saved}")
    return summary


def _time_split(summary: dict[str, Any]) -> str:
    """The run's wall time by phase: the warm start (when trained now), start-up (Ray, the actors,
    the first held-out evaluation), the steps, the final evaluation and save."""
    def g(key: str) -> float:
        return summary.get(key, 0.0)

    start = g("perf/wall_time_s") - g("perf/warm_start_s") - g("perf/loop_s") - g("perf/final_s") - g("perf/save_s")
    parts = [("warm start", g("perf/warm_start_s")), ("start-up", start), ("steps", g("perf/loop_s")),
             ("final eval and save", g("perf/final_s") + g("perf/save_s"))]  # fmt: skip
    return ", ".join(f"{name} {sec:.0f}s" for name, sec in parts if sec >= 0.5)


def _resolve_plugins(cfg: RunConfig) -> None:
    """Fail fast on a bad plugin path or kwarg, or a missing vLLM, before any actor starts."""
    if cfg.envs:
        resolve_envs(cfg.envs)
        for spec in cfg.envs:
            resolve_rewards(RewardsConfig(functions=spec.rewards))
    else:
        resolve_rewards(cfg.rewards)
    if cfg.rollout.engine == "vllm":
        from tidal.rollout.vllm_engine import require_vllm

        require_vllm()


def _start_buffer(cfg: RunConfig) -> Any:
    """The buffer actor: threaded, so workers put while the driver waits and the trainer takes."""
    import ray

    from tidal.rollout.buffer import TrajectoryBuffer

    r = cfg.rollout
    per_step = None if r.deterministic else r.prompts_per_step
    return ray.remote(max_concurrency=16)(TrajectoryBuffer).remote(cfg.filter, r.max_staleness, per_step)


def _start_workers(cfg: RunConfig, model_dir: str, buffer: Any, worker_cls: type | None) -> list[Any]:
    import ray

    from tidal.rollout.worker import CONCURRENCY_GROUPS, RolloutWorker, WorkerConfig

    r = cfg.rollout
    return [
        ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(worker_cls or RolloutWorker)
        .options(num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker)
        .remote(WorkerConfig.of(cfg), model_dir, i, buffer)
        for i in range(r.num_workers)
    ]  # fmt: skip


def _join_weight_sync(cfg: RunConfig, trainer: TrainerGroup, workers: list[Any]) -> None:
    """Both ends of the weight transport (trainer rank 0 publishes); a broadcast group forms only once
    all members call in."""
    group = wait_for(trainer.rank0.weight_sync_group.remote(len(workers)), "weight-sync setup", cfg.ray.timeout_s)
    calls = [trainer.rank0.join_weight_sync.remote(group)] + [w.join_weight_sync.remote(group) for w in workers]
    wait_for(calls, "weight-sync setup", cfg.ray.timeout_s)


def _loop(
    cfg: RunConfig, sampler: PromptSampler, eval_rows: list[Prompt], workers: list[Any], buffer: Any,
    trainer: TrainerGroup, monitor: Monitor, warm: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The asynchronous loop. Workers generate rollout batches ahead of the trainer as far as the
    staleness bound allows (`may_dispatch`); step s trains the oldest ready groups (batch s in
    deterministic mode). With max_staleness 0 rollout and training take turns (on-policy).
    Held-out evaluations run on worker 0 between its generate calls, without stalling the loop."""
    get = partial(wait_for, timeout_s=cfg.ray.timeout_s)
    minibatches, steps = cfg.algorithm.minibatches, cfg.train.steps
    bound = StalenessBound(cfg.rollout.max_staleness, cfg.rollout.adaptive_staleness)
    dispatch = Dispatcher(cfg, sampler, workers, buffer, serving=[w.serve.remote() for w in workers])
    evals = EvalTracker(workers[0], eval_rows, cfg.ray.timeout_s)
    evals.request(0)  # first in worker 0's queue: the weights it starts with
    offers = SyncTracker()
    version = published = 0  # the trainer's version; the newest version offered to the workers
    next_batch, t_prev = 1, time.perf_counter()
    t_loop, first_eval_s = t_prev, 0.0
    before: dict[str, float] = {}
    schedule = (cfg.run_dir / "schedule.jsonl").open("w", buffering=1)  # each step's groups, as trained
    for step in range(1, steps + 1):
        while next_batch <= steps and may_dispatch(next_batch, step, version, published, minibatches, bound.bound):
            dispatch.batch(next_batch, published)
            next_batch += 1
        if step == 1:
            before = values((evals.collect(wait=True) or [{}])[-1])
            first_eval_s = time.perf_counter() - t_loop
            monitor.log({**before, **{f"warm_start/{k}": v for k, v in warm.items() if isinstance(v, float)}}, step=0)
        t0 = time.perf_counter()
        dispatch.wait(step, version, published)
        t1 = time.perf_counter()
        result: StepResult = get(trainer.call("step", batch_id=step), "trainer step")[0]
        schedule.write(json.dumps({"step": step, "version": version, "groups": result.groups}) + "\n")
        version = result.version
        metrics = merge([result.metrics, get(buffer.pop_counts.remote(), "buffer"), dispatch.metrics()])
        metrics["async/staleness_bound"] = largest(float(bound.bound))  # what this step dispatched under
        bound.update(values(metrics))
        t2 = time.perf_counter()
        evaluate = step == steps or bool(cfg.train.eval_every and step % cfg.train.eval_every == 0)
        if step % cfg.weight_sync.every == 0 or evaluate:
            handle, publish_metrics = get(trainer.call("publish"), "weight publish")[0]
            offers.add([w.offer_weights.remote(handle) for w in workers])
            published = handle.version
            metrics.update(publish_metrics)
            if evaluate:
                evals.request(published)
        t3 = time.perf_counter()
        *older, newest = evals.collect(wait=step == steps) or [{}]
        for m in older:  # ended together with a newer one: a row of its own, so no evaluation goes unlogged
            monitor.log(values(m), step=step)
        metrics.update(newest)
        metrics.update(offers.collect(cfg.ray.timeout_s if step == steps else 0.0))
        t4 = time.perf_counter()
        last = {**values(metrics), "train/version": float(version)}
        last.update(_perf(last, (t_prev, t0, t1, t2, t3, t4)))
        t_prev = t4
        monitor.log(last, step=step)
    schedule.close()
    for w in workers:
        w.stop.remote()
    ledger = {**get(buffer.ledger.remote(), "buffer"), **get(trainer.rank0.ledger.remote(), "trainer")}
    return {
        **{f"{k}_before": v for k, v in before.items() if k.startswith("eval/")},
        **{k: v for k, v in last.items() if k.startswith("eval/")},
        "warm_start/eval/accuracy": warm.get("eval/accuracy", float("nan")),
        **{f"ledger/{k}": float(v) for k, v in ledger.items()},
        "ledger/sampled_prompts": float(sampler.next_group_id),
        "perf/first_eval_s": first_eval_s,
        "perf/loop_s": t3 - t_loop - first_eval_s,  # step 1 to the last step's publish
        "perf/final_s": t4 - t3,  # the last step's wait for the final evaluation and weight offers
    }


def _perf(m: dict[str, float], times: tuple[float, ...]) -> dict[str, float]:
    """Wall-clock split of one driver step: waiting for the batch's rollout (what the trainer idles
    on), the train step, publishing, evaluation; step time is end to end since the last step."""
    t_prev, t0, t1, t2, t3, t4 = times
    return {
        "perf/step_time_s": t4 - t_prev,
        "perf/rollout_wall_s": t1 - t0,
        "perf/train_wall_s": t2 - t1,
        "perf/sync_wall_s": t3 - t2,
        "perf/eval_wall_s": t4 - t3,
        "perf/rollout_tokens_per_s": m.get("perf/rollout_tokens", 0.0) / max(m.get("perf/generate_time_s", 0.0), 1e-9),
    }
