"""Overlap efficiency of the asynchronous loop: rollout and training replaced by calibrated sleeps.

The real driver loop, Ray actors, trajectory buffer, weight publishing (object store, the tiny
model's real weights) and the workers' weight offers all run as in `tidal train`; only the work
inside is a sleep: each rollout batch takes R seconds (`RolloutWorker._generate`) and each update T
seconds (`TrainerActor._train`, which then counts one optimizer step). For each R/T ratio the
synchronous loop (max_staleness 0) and the asynchronous one (max_staleness 1) run one after the
other; the steady-state step time (median, first steps and the final evaluation step excluded) is
compared with its ideal: R + T for the synchronous loop, max(R, T) for the asynchronous one.

    .venv/bin/python bench/overlap.py [--longest 0.8] [--steps 14] [--ratios 0.25,1,4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from tidal.rollout.worker import RolloutWorker
from tidal.telemetry.metrics import Metrics, largest
from tidal.trainer.actor import TrainerActor
from tidal.types import Group, Prompt, Sample

WARMUP_STEPS = 3


class SleepWorker(RolloutWorker):
    """Rollout that sleeps `BENCH_R` seconds and returns fixed samples with mixed answers."""

    def _generate(self, prompts: list[Prompt], seed: int) -> list[Sample]:
        time.sleep(float(os.environ["BENCH_R"]))
        v = self.version
        return [
            Sample(
                p.group_id,
                [1, 2],
                [3, 4],
                [1, 1],
                [-1.0, -1.0],
                "stop",
                v,
                [v, v],
                text=p.row["answer"] if j % 2 else "x",
                row=p.row,
            )  # half right: every group has variance
            for p in prompts
            for j in range(self.cfg.rollout.group_size)
        ]


class SleepTrainer(TrainerActor):
    """Update that sleeps `BENCH_T` seconds and counts as one optimizer step (the weights stay)."""

    def _train(self, groups: list[Group]) -> Metrics:
        time.sleep(float(os.environ["BENCH_T"]))
        ages = [self.version - s.version for g in groups for s in g.samples]
        self.trainer.engine.global_steps += 1
        return {"async/staleness_max": largest(float(max(ages)))}


def run(r: float, t: float, staleness: int, steps: int, out_dir: Path) -> dict[str, float]:
    from tidal.config import load_config
    from tidal.stages.train import run_train

    os.environ.update(BENCH_R=str(r), BENCH_T=str(t))
    name = f"r{r:g}-t{t:g}-k{staleness}"
    cfg = load_config(
        None,
        [
            f"name={name}",
            f"output_dir={out_dir}",
            "model.preset=tiny-qwen3-moe",
            "rollout.group_size=4",
            "rollout.prompts_per_step=8",
            f"rollout.max_staleness={staleness}",
            f"train.steps={steps}",
            "train.eval_every=0",
            "data.source.eval_size=1",
            "filter.zero_variance=false",
            "monitor.wandb=disabled",
            "train.save_checkpoint=false",
        ],
    )
    run_train(cfg, worker_cls=SleepWorker, trainer_cls=SleepTrainer)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [row for row in rows if WARMUP_STEPS < row.get("step", 0) < steps and "perf/step_time_s" in row]
    return {
        "step_s": statistics.median(row["perf/step_time_s"] for row in steady),
        "staleness_max": max(row["async/staleness_max"] for row in rows if "async/staleness_max" in row),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--longest", type=float, default=0.8, help="seconds of the longer of R and T")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--ratios", default="0.25,1,4", help="R/T ratios")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in (float(x) for x in args.ratios.split(",")):
            r, t = (args.longest, args.longest / ratio) if ratio >= 1 else (args.longest * ratio, args.longest)
            sync, async_ = (run(r, t, k, args.steps, Path(tmp)) for k in (0, 1))
            results.append((ratio, r, t, sync, async_))
    print(f"\nsteady-state step time, median of steps {WARMUP_STEPS + 1}..{args.steps - 1} (seconds)")
    print(
        f"{'R/T':>5} {'R':>5} {'T':>5} | {'sync':>6} {'/(R+T)':>7} | {'async':>6} {'/max(R,T)':>9} "
        f"{'staleness':>9} | {'speed-up':>8}"
    )
    for ratio, r, t, sync, async_ in results:
        print(
            f"{ratio:>5g} {r:>5.2f} {t:>5.2f} | {sync['step_s']:>6.3f} {sync['step_s'] / (r + t):>7.3f} | "
            f"{async_['step_s']:>6.3f} {async_['step_s'] / max(r, t):>9.3f} {async_['staleness_max']:>9.0f} | "
            f"{sync['step_s'] / async_['step_s']:>7.2f}x"
        )


if __name__ == "__main__":
    main()
