"""`tidal train`: the RL driver. Builds the actors from the config and runs the loop.

Data flow (docs/architecture.md): prompts -> RolloutWorker x N (generate + score groups) -> TrajectoryBuffer
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
import uuid
from pathlib import Path
from typing import Any

from datasets import Dataset

from tidal import checkpoint
from tidal.config import RunConfig, dump_config
from tidal.driver.loop import Driver, StopSignal
from tidal.driver.supervisor import WorkerLost, join_weight_sync
from tidal.runtime import (
    RunError,
    Stalled,
    actor_error_line,
    dump_stacks,
    run_log,
    start_ray,
    wait_for,
)
from tidal.stages.check import check_train
from tidal.stages.plan import summary as plan_summary
from tidal.stages.warm_start import resolve_policy_dir
from tidal.telemetry.monitor import Monitor
from tidal.trainer.group import TrainerGroup
from tidal.types import Prompt

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

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": self.order, "next_group_id": self.next_group_id}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.order, self.next_group_id = state["order"], state["next_group_id"]


def run_train(cfg: RunConfig, worker_cls: type | None = None, trainer_cls: type | None = None) -> dict[str, Any]:
    """Train with RL; returns the summary (held-out accuracy before / after, ledger, wall time).

    With `train.resume` the run continues from its newest complete checkpoint. SIGTERM or SIGINT
    stops it at the end of the step, with a checkpoint to resume from.

    `worker_cls` / `trainer_cls` replace the RolloutWorker / TrainerActor classes (benchmarks swap
    in calibrated sleeps while keeping the real actors, buffer and weight sync around them).
    """
    import ray

    from tidal.trainer.actor import TrainerActor, TrainerActorConfig

    t_start = time.time()
    split: dict[str, float] = {}  # where the run's wall time went (summary perf/*_s)
    start = check_train(cfg)  # every refusal of a config, before anything starts or is written
    cfg, resumed, eval_rows = start.cfg, start.resumed, start.held_out
    sampler = PromptSampler(start.sources, cfg.seed)
    run_dir = cfg.run_dir
    model_dir, warm, monitor, file_log = _open_run(cfg, resumed, split)
    t0 = time.time()
    start_ray(cfg, log_file=run_dir / "run.log")
    split["perf/ray_start_s"] = (t_ray := time.time()) - t0
    log.info("run %s: metrics, checkpoint and log (run.log, with the actors' output) in %s", cfg.name, run_dir)
    log.info(plan_summary(start.plan))
    trainer = None
    try:
        buffer_name = f"tidal-buffer-{uuid.uuid4().hex}"  # unique on a cluster that runs several
        buffer = _start_buffer(cfg, buffer_name)
        # The trainer's placement group first: packed ranks get whole nodes' GPUs before the workers'.
        trainer_args = (TrainerActorConfig.of(cfg), str(model_dir), buffer)
        trainer = TrainerGroup(trainer_cls or TrainerActor, cfg.trainer, trainer_args, cfg.ray.stall_timeout_s)
        workers = _start_workers(cfg, str(model_dir), buffer_name, worker_cls)
        _join_weight_sync(cfg, trainer, workers)
        if resumed:  # the trainer's DeepSpeed checkpoint, the buffer's groups and ledger
            path = str(resumed["path"] / checkpoint.TRAINER)
            loads = [*trainer.call("load_state", path), buffer.load_state.remote(resumed["buffer"])]
            wait_for(loads, "resuming from the checkpoint", cfg.ray.stall_timeout_s)
        split["perf/actors_start_s"] = time.time() - t_ray
        with StopSignal() as stop:
            summary = Driver(cfg, sampler, eval_rows, workers, buffer, trainer, monitor, stop, resumed).run(warm)
        t0 = time.time()
        if cfg.train.save_checkpoint and "stopped_at_step" not in summary:
            saved = trainer.call("save", str(run_dir / "checkpoint"), cfg.train.save_merged)
            summary["checkpoint"] = wait_for(saved, "checkpoint save", cfg.ray.stall_timeout_s)[0]
        summary["perf/save_s"] = time.time() - t0
        summary["perf/wall_time_s"] = time.time() - t_start
        summary.update(split)
        monitor.log({k: v for k, v in summary.items() if isinstance(v, float)}, step=cfg.train.steps)
    except (ray.exceptions.RayError, Stalled, WorkerLost) as e:
        raise _failure(e, run_dir) from None
    finally:
        if trainer is not None:
            trainer.close()
        ray.shutdown()
        monitor.close()
        logging.getLogger().removeHandler(file_log)
        file_log.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(_last_line(summary, cfg.train.steps, bool(eval_rows)))
    return summary


def _open_run(
    cfg: RunConfig, resumed: dict[str, Any] | None, split: dict[str, float]
) -> tuple[Path, dict[str, Any], Monitor, logging.Handler]:
    """The run directory (a resumed run's logs cut back to its checkpoint, the config written), the
    policy's weights (warm-started when configured: the time in `split`), the monitor (a resumed run
    goes on in its wandb run) and the run's log file."""
    if resumed:
        _cut_back(cfg, resumed)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
    t0 = time.time()
    model_dir, warm = resolve_policy_dir(cfg.model)
    if cfg.algorithm.distill is not None:  # a teacher named by its SFT config is trained on first use too
        resolve_policy_dir(cfg.algorithm.distill.teacher_model())
    split["perf/warm_start_s"] = time.time() - t0
    wandb_id = resumed["wandb_id"] if resumed else None
    monitor = Monitor.for_run(
        cfg.monitor, cfg.run_dir, cfg.name, cfg.model_dump(mode="json"), cfg.train.steps, wandb_id=wandb_id
    )
    return model_dir, warm, monitor, run_log(cfg.run_dir)


def _failure(e: Exception, run_dir: Path) -> RunError:
    """The one line a failed run stops with: the cause, for a hang every actor's stack (written now,
    while Ray is up: where each is stuck says which and why), and how to resume."""
    if isinstance(e, Stalled):
        stacks = dump_stacks(run_dir / "stacks.txt")
        line = f"{e}; " + (f"every actor's stack is in {stacks}" if stacks else "see the run's run.log")
    elif isinstance(e, WorkerLost):
        line = str(e)
    else:
        line = actor_error_line(e, logs=str(run_dir / "run.log"))
    return RunError(f"{line}; {checkpoint.resume_hint(run_dir)}")


def _last_line(summary: dict[str, Any], steps: int, held_out: bool) -> str:
    if "stopped_at_step" in summary:
        return (
            f"stopped by {summary['stopped_by']} at step {summary['stopped_at_step']} of {steps}: checkpoint in "
            f"{summary['resumable_checkpoint']}; to continue, run the same command with train.resume=true"
        )
    before, after = summary.get("eval/accuracy_before", float("nan")), summary.get("eval/accuracy", float("nan"))
    saved = f"; checkpoint at {summary['checkpoint']}" if "checkpoint" in summary else ""
    accuracy = f"held-out accuracy {before:.1%} -> {after:.1%}" if held_out else "no held-out data to evaluate"
    return f"train done in {summary['perf/wall_time_s']:.0f}s ({_time_split(summary)}): {accuracy}{saved}"


def _cut_back(cfg: RunConfig, resumed: dict[str, Any]) -> None:
    """The run's logs cut back to the step of the checkpoint it resumes from, and the resume's first
    log line, which says how the lr schedule goes on."""
    for name in ("metrics.jsonl", "schedule.jsonl"):
        checkpoint.truncate_rows(cfg.run_dir / name, resumed["step"])
    log.info("resuming %s from step %d (%s); %s", cfg.name, resumed["step"], resumed["path"], resumed["schedule"])


def _time_split(summary: dict[str, Any]) -> str:
    """The run's wall time by phase: the warm start (when trained now), start-up (Ray, the actors,
    the first held-out evaluation), the steps, the final evaluation and save."""

    def g(key: str) -> float:
        return summary.get(key, 0.0)

    start = g("perf/wall_time_s") - g("perf/warm_start_s") - g("perf/loop_s") - g("perf/final_s") - g("perf/save_s")
    parts = [
        ("warm start", g("perf/warm_start_s")),
        ("start-up", start),
        ("steps", g("perf/loop_s")),
        ("final eval and save", g("perf/final_s") + g("perf/save_s")),
    ]
    return ", ".join(f"{name} {sec:.0f}s" for name, sec in parts if sec >= 0.5)


def _start_buffer(cfg: RunConfig, name: str) -> Any:
    """The buffer actor, named `name`: threaded, so workers put while the driver waits and the trainer
    takes."""
    import ray

    from tidal.rollout.buffer import TrajectoryBuffer

    r = cfg.rollout
    per_step = None if r.deterministic else r.prompts_per_step
    return (
        ray.remote(max_concurrency=16)(TrajectoryBuffer)
        .options(name=name)
        .remote(cfg.filter, r.max_staleness, per_step)
    )


def _start_workers(cfg: RunConfig, model_dir: str, buffer: str, worker_cls: type | None) -> list[Any]:
    """The rollout workers. Each gets the buffer's name and looks it up itself: a restart runs the
    constructor again with the same arguments, and an object reference among them (an actor handle
    is one) may be gone by then (ray-project/ray#53727; Ray warns of it on the terminal). Names and
    plain values cannot be lost, and the buffer lives as long as the driver holds its handle."""
    import ray

    from tidal.rollout.worker import CONCURRENCY_GROUPS, RolloutWorker, WorkerConfig

    r = cfg.rollout
    return [
        ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(worker_cls or RolloutWorker)
        .options(num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker, max_restarts=r.max_worker_restarts)
        .remote(WorkerConfig.of(cfg), model_dir, i, buffer)
        for i in range(r.num_workers)
    ]


def _join_weight_sync(cfg: RunConfig, trainer: TrainerGroup, workers: list[Any]) -> None:
    group = wait_for(trainer.rank0.weight_sync_group.remote(len(workers)), "weight-sync setup", cfg.ray.stall_timeout_s)
    join_weight_sync(trainer.rank0, workers, group, cfg.ray.stall_timeout_s)
