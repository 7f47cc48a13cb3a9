"""The quickstart run on-policy against asynchronous: wall time for the same steps, accuracy reached.

Each variant is `tidal train configs/quickstart.yaml` with overrides, run one after the other on
the same machine (the SFT warm start is trained once and reused): max_staleness 0 (on-policy,
rollout and training take turns), 1 and 2 with the quickstart's truncated-IS correction, and 2
with correction `none` (plain PPO on pi / pi_old, which ignores that the samples came from older
weights). Wall time is the train loop's (actors started, before the first step, to the end).

    .venv/bin/python bench/async_quickstart.py [--steps 300] [--variants k0,k1,k2,k2-none] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

VARIANTS = {
    "k0": ["rollout.max_staleness=0"],
    "k1": ["rollout.max_staleness=1"],
    "k2": ["rollout.max_staleness=2"],
    "k2-none": ["rollout.max_staleness=2", "algorithm.loss.correction={type: none}"],
    "k2-mask": ["rollout.max_staleness=2", "algorithm.loss.correction={type: mask, low: 0.5, high: 2.0}"],
}


def main() -> None:
    from tidal.config import load_config
    from tidal.stages.train import run_train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=None, help="train.steps (default: the config's)")
    ap.add_argument("--variants", default="k0,k1,k2,k2-none")
    ap.add_argument("--out", default="runs/bench-async")
    ap.add_argument("overrides", nargs="*", help="further key=value overrides for every variant")
    args = ap.parse_args()
    results = []
    for name in args.variants.split(","):
        steps = [f"train.steps={args.steps}"] if args.steps else []
        cfg = load_config(
            args.config,
            [
                *VARIANTS[name],
                *steps,
                *args.overrides,
                f"name={name}",
                f"output_dir={args.out}",
                "monitor.wandb=disabled",
            ],
        )
        summary = run_train(cfg)
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in rows if "train/loss" in r]
        evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
        results.append(
            {
                "variant": name,
                "steps": cfg.train.steps,
                "loop_s": sum(r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r),
                "before": summary["eval/accuracy_before"],
                "after": summary["eval/accuracy"],
                "best": max(evals.values()),
                "staleness_mean": statistics.fmean(r["async/staleness_mean"] for r in trained),
                "trainer_idle_s": sum(r["async/trainer_idle_s"] for r in rows if "async/trainer_idle_s" in r),
                "dropped": summary["ledger/dropped_stale_groups"],
                "evals": evals,
            }
        )
        Path(args.out, "results.json").write_text(json.dumps(results, indent=2))
    base = results[0]["loop_s"]
    print(
        f"\n{'variant':>8} {'steps':>5} {'loop s':>7} {'speed-up':>8} {'acc before':>10} {'acc after':>9} "
        f"{'best':>6} {'staleness':>9} {'trainer idle s':>14} {'dropped':>7}"
    )
    for r in results:
        print(
            f"{r['variant']:>8} {r['steps']:>5} {r['loop_s']:>7.0f} {base / r['loop_s']:>7.2f}x "
            f"{r['before']:>10.1%} {r['after']:>9.1%} {r['best']:>6.1%} {r['staleness_mean']:>9.2f} "
            f"{r['trainer_idle_s']:>14.0f} {r['dropped']:>7.0f}"
        )


if __name__ == "__main__":
    main()
