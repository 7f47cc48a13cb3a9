"""`tidal train`: the RL driver. Builds the actors from the config and runs the loop.

Data flow (DESIGN.md): prompts -> RolloutWorker x N (generate + score groups) -> TrajectoryBuffer
(filter, staleness bound) -> Trainer (recompute log-probs, advantages, corrected policy loss,
optimizer step) -> weights published back to the workers. With `max_staleness: 0` this runs
on-policy: each step's samples come from the weights the trainer holds.
"""

from __future__ import annotations

import json
import logging
import random
import time
from functools import partial
from typing import Any

from datasets import Dataset

from tidal.config import RunConfig, dump_config
from tidal.data import load_splits
from tidal.monitor import Monitor
from tidal.rewards import resolve_rewards
from tidal.runtime import RunError, absolute_plugin_paths, actor_error_line, start_ray, wait_for
from tidal.warm_start import resolve_policy_dir

log = logging.getLogger(__name__)


class PromptSampler:
    """Endless shuffled passes over the train split; hands out (group id, row) pairs."""

    def __init__(self, ds: Dataset, seed: int) -> None:
        self.rows = ds.to_list()
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.next_group_id = 0

    def take(self, n: int) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for _ in range(n):
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            out.append((self.next_group_id, self.rows[self.order.pop()]))
            self.next_group_id += 1
        return out


def run_train(cfg: RunConfig) -> dict[str, float]:
    """Train with RL; returns the summary (held-out accuracy before / after, wall time)."""
    import ray

    from tidal.rollout.buffer import TrajectoryBuffer
    from tidal.rollout.worker import RolloutWorker
    from tidal.trainer.actor import TrainerActor

    t_start = time.time()
    cfg = absolute_plugin_paths(cfg)
    resolve_rewards(cfg.rewards)  # fail fast on a bad plugin path, before any actor starts
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model_dir, warm = resolve_policy_dir(cfg.model)
    train_ds, eval_ds = load_splits(cfg.data)
    eval_rows = eval_ds.to_list() if eval_ds is not None else []
    sampler = PromptSampler(train_ds, cfg.seed)
    monitor = Monitor.for_run(cfg.monitor, run_dir, cfg.name, cfg.model_dump(mode="json"), cfg.train.steps)
    start_ray(cfg)
    try:
        buffer = ray.remote(TrajectoryBuffer).remote(cfg.filter, cfg.rollout.max_staleness)
        workers = [
            ray.remote(RolloutWorker).options(num_cpus=cfg.rollout.num_cpus_per_worker)
            .remote(cfg, str(model_dir), i, buffer)
            for i in range(cfg.rollout.num_workers)
        ]  # fmt: skip
        trainer = ray.remote(TrainerActor).options(num_cpus=cfg.trainer.num_cpus).remote(cfg, str(model_dir), buffer)
        summary = _loop(cfg, sampler, eval_rows, workers, buffer, trainer, monitor, warm)
        if cfg.train.save_checkpoint:
            saved = trainer.save.remote(str(run_dir / "checkpoint"))
            summary["checkpoint"] = wait_for(saved, "checkpoint save", cfg.ray.timeout_s)
        summary["perf/wall_time_s"] = time.time() - t_start
        monitor.log({k: v for k, v in summary.items() if isinstance(v, float)}, step=cfg.train.steps)
    except ray.exceptions.RayError as e:
        raise RunError(actor_error_line(e)) from None
    finally:
        ray.shutdown()
        monitor.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    before, after = summary.get("eval/accuracy_before", float("nan")), summary.get("eval/accuracy", float("nan"))
    print(f"train done in {summary['perf/wall_time_s']:.0f}s: held-out accuracy {before:.1%} -> {after:.1%}"
          + (f"; checkpoint at {summary['checkpoint']}" if "checkpoint" in summary else ""))  # fmt: skip
    return summary


def _loop(
    cfg: RunConfig, sampler: PromptSampler, eval_rows: list[dict[str, Any]], workers: list[Any], buffer: Any,
    trainer: Any, monitor: Monitor, warm: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The on-policy loop: rollout -> buffer -> train -> publish, one step per rollout batch."""
    get = partial(wait_for, timeout_s=cfg.ray.timeout_s)
    before = get(workers[0].evaluate.remote(eval_rows), "held-out evaluation") if eval_rows else {}
    monitor.log({**before, **{f"warm_start/{k}": v for k, v in warm.items() if isinstance(v, float)}}, step=0)
    metrics: dict[str, float] = dict(before)
    for step in range(1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        chunks = _split(sampler.take(cfg.rollout.prompts_per_step), len(workers))
        seeds = [cfg.seed * 1_000_003 + step * len(workers) + i for i in range(len(workers))]
        rolled = get([w.rollout.remote(c, s) for w, c, s in zip(workers, chunks, seeds, strict=True)], "rollout")
        t1 = time.perf_counter()
        metrics = merge_worker_metrics([m for _, m in rolled])
        metrics.update(get(trainer.step.remote(), "trainer step"))
        metrics.update(get(buffer.pop_counts.remote(), "buffer"))
        t2 = time.perf_counter()
        snapshot = trainer.publish.remote()  # an object ref: each worker fetches it from the object store
        get([w.load_weights.remote(snapshot) for w in workers], "weight sync")
        t3 = time.perf_counter()
        if eval_rows and (step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0)):
            metrics.update(get(workers[0].evaluate.remote(eval_rows), "held-out evaluation"))
        metrics.update(_perf(metrics, t0, t1, t2, t3, time.perf_counter()))
        monitor.log(metrics, step=step)
    return {
        **{f"{k}_before": v for k, v in before.items() if k.startswith("eval/")},
        **{k: v for k, v in metrics.items() if k.startswith("eval/")},
        "warm_start/eval/accuracy": warm.get("eval/accuracy", float("nan")),
    }


def _split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


SUMMED = ("rollout/samples", "perf/rollout_tokens", "reward/failed")


def merge_worker_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """One row from per-worker rows: counts summed, times as the slowest worker, the rest
    averaged weighted by each worker's samples."""
    out: dict[str, float] = {}
    weights = [r.get("rollout/samples", 1.0) for r in rows]
    total = sum(weights) or 1.0
    for k in {k for r in rows for k in r}:
        vals = [(r[k], w) for r, w in zip(rows, weights, strict=True) if k in r]
        if k.startswith(SUMMED):
            out[k] = sum(v for v, _ in vals)
        elif k.endswith("_time_s"):
            out[k] = max(v for v, _ in vals)
        else:
            out[k] = sum(v * w for v, w in vals) / (sum(w for _, w in vals) or total)
    return out


def _perf(m: dict[str, float], t0: float, t1: float, t2: float, t3: float, t4: float) -> dict[str, float]:
    return {
        "perf/step_time_s": t4 - t0,
        "perf/rollout_wall_s": t1 - t0,
        "perf/train_wall_s": t2 - t1,
        "perf/sync_wall_s": t3 - t2,
        "perf/eval_wall_s": t4 - t3,
        "perf/rollout_tokens_per_s": m.get("perf/rollout_tokens", 0.0) / max(m.get("perf/generate_time_s", 0.0), 1e-9),
    }
