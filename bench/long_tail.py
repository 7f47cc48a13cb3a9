"""Long-tailed response lengths: lockstep rollout against streaming, with and without partial rollouts.

A synthetic task: arithmetic prompts, each with its own response length drawn from a log-normal
(median 8 tokens, sigma 1.2: p99 / median about 16) and generated to exactly that length
(`rollout.ignore_eos`, the row's `max_new_tokens`), so every variant generates the same tokens for
the same prompts. A random-init tiny MoE (the reward is a coin flip on the text: the
trainer's work is real, learning is not the point). Variants, run one after the other in one
process on the same machine:

- lockstep: `rollout.deterministic: true`, today's fixed batches: a worker generates its share of
  batch b as one call, and step b waits for the slowest group of the batch;
- streaming: the default: groups join a running generate call as rows free up, enter the buffer as
  they end, and a step takes the oldest ready groups;
- streaming+partial: streaming with `rollout.interruptible` (in-flight rows take new weights at a
  chunk boundary instead of the call ending first).

Reported per variant: the train loop's wall time (first step to last), rollout tokens/s over it,
the trainer's idle time waiting for batches, the median step time, and the speed-up over lockstep.

    .venv/bin/python bench/long_tail.py [--steps 12] [--engines transformers,vllm] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
from pathlib import Path

VARIANTS = {
    "lockstep": ["rollout.deterministic=true"],
    "streaming": [],
    "streaming+partial": ["rollout.interruptible=true"],
}
COIN = """
import zlib

def coin(sample, row):
    return float(zlib.crc32(f"{sample.group_id} {sample.text}".encode()) % 2)
"""


def write_task(d: Path, rows: int, median: float, sigma: float, cap: int, seed: int) -> tuple[Path, list[int]]:
    rng = random.Random(seed)
    lengths = [max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(rows)]
    path = d / "long_tail.jsonl"
    with path.open("w") as f:
        for i, n in enumerate(lengths):
            a, b = rng.randrange(100), rng.randrange(100)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b), "max_new_tokens": n, "i": i}) + "\n")
    (d / "coin.py").write_text(COIN)
    return path, lengths


def main() -> None:
    from tidal.config import load_config
    from tidal.stages.train import run_train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--engines", default="transformers")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--median", type=float, default=8.0)
    ap.add_argument("--sigma", type=float, default=1.2)
    ap.add_argument("--cap", type=int, default=256)
    ap.add_argument("--out", default="runs/bench-long-tail")
    ap.add_argument("overrides", nargs="*", help="further key=value overrides for every variant")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tidal-long-tail-"))
    data, lengths = write_task(tmp, 4096, args.median, args.sigma, args.cap, seed=0)
    ordered = sorted(lengths)
    p50, p99 = ordered[len(ordered) // 2], ordered[int(0.99 * len(ordered))]
    mean = statistics.fmean(lengths)
    print(f"response lengths: median {p50}, p99 {p99} (p99/median {p99 / p50:.1f}), mean {mean:.1f}")
    results = []
    for engine in args.engines.split(","):
        for name in args.variants.split(","):
            cfg = load_config(
                None,
                [
                    "model.preset=tiny-qwen3-moe",
                    f"data.source={{type: files, train_files: ['{data}'], metadata_fields: [max_new_tokens]}}",
                    f"rewards.functions=[{{path: '{tmp / 'coin.py'}:coin'}}]",
                    f"rollout.engine={engine}",
                    f"rollout.max_new_tokens={args.cap}",
                    "rollout.ignore_eos=true",
                    "rollout.group_size=4",
                    "rollout.prompts_per_step=8",
                    "rollout.batch_size=64",
                    "rollout.max_staleness=2",
                    "rollout.chunk_tokens=4",
                    "filter.zero_variance=false",
                    "trainer.lr=1e-4",
                    "trainer.micro_batch_size=32",
                    f"train.steps={args.steps}",
                    "train.eval_every=0",
                    "train.save_checkpoint=false",
                    "monitor.wandb=disabled",
                    f"output_dir={args.out}",
                    f"name={engine}-{name}",
                    *VARIANTS[name],
                    *args.overrides,
                ],
            )
            run_train(cfg)
            rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in rows if "perf/step_time_s" in r]
            loop = sum(r["perf/step_time_s"] for r in steps)
            tokens = sum(r.get("perf/rollout_tokens", 0.0) for r in steps)
            results.append(
                {
                    "engine": engine,
                    "variant": name,
                    "loop_s": loop,
                    "rollout_tokens": tokens,
                    "tokens_per_s": tokens / loop,
                    "trainer_idle_s": sum(r["perf/rollout_wall_s"] for r in steps),
                    "median_step_s": statistics.median(r["perf/step_time_s"] for r in steps),
                    "interrupted_samples": sum(r.get("rollout/interrupted_samples", 0.0) for r in steps),
                }
            )
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"\n{'engine':>12} {'variant':>18} {'loop s':>7} {'speed-up':>8} {'tokens':>7} {'tokens/s':>8} "
        f"{'trainer idle s':>14} {'median step s':>13} {'interrupted':>11}"
    )
    for r in results:
        base = next(b for b in results if b["engine"] == r["engine"] and b["variant"] == "lockstep")["loop_s"]
        print(
            f"{r['engine']:>12} {r['variant']:>18} {r['loop_s']:7.1f} {base / r['loop_s']:7.2f}x "
            f"{r['rollout_tokens']:7.0f} {r['tokens_per_s']:8.0f} {r['trainer_idle_s']:14.1f} "
            f"{r['median_step_s']:13.2f} {r['interrupted_samples']:11.0f}"
        )


if __name__ == "__main__":
    main()
