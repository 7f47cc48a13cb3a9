"""LoRA against full fine-tuning on the quickstart: held-out accuracy after the same steps, the
trainer's memory, and what a publish costs (issue 32).

Cells, each `tidal train configs/quickstart.yaml` from the same cached SFT warm start, one after the
other on this machine, for every seed:

- `full`: the quickstart as it is (full fine-tuning, lr 3e-4);
- `lora`: `model.lora: {r: 16, alpha: 32}` on the attention projections and the experts, publishing
  the adapters alone, at a LoRA learning rate (`--lora-lr`, default 3e-3: adapters start at zero
  and take ten times full fine-tuning's rate, as peers' LoRA recipes do);
- `lora-attn`: the same on the attention projections only (`experts: false`).

Per cell: held-out accuracy before and after (mean and std over seeds), the trainable parameters
and the trainer's memory as the memory plan counts them (`tidal plan`: optimizer states, gradients,
the rank's peak), the bytes and seconds of a publish (`perf/publish_mb`, `perf/publish_time_s`,
means over the run), and the held-out log-prob mismatch between the rollout engine and the trainer
at the end (`eval/logp_mismatch_mean`: the engine runs what the trainer trains).

Results are appended to OUT/results.json after every run; rerunning skips the runs already there.

    .venv/bin/python bench/lora.py [--steps 150] [--seeds 1,2,3] [--cells full,lora,lora-attn]
        [--lora-lr 3e-3] [--out runs/bench-lora] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

LORA = "model.lora={r: 16, alpha: 32}"
CELLS = {
    "full": [],
    "lora": [LORA],
    "lora-attn": ["model.lora={r: 16, alpha: 32, experts: false}"],
}


def overrides(args: argparse.Namespace, cell: str, seed: int) -> list[str]:
    lr = [f"trainer.lr={args.lora_lr}"] if cell != "full" else []
    return [
        *CELLS[cell],
        *lr,
        f"seed={seed}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        *args.overrides,
        f"name={cell}-s{seed}",
        f"output_dir={args.out}",
        "monitor.wandb=disabled",
    ]


def run_cell(args: argparse.Namespace, cell: str, seed: int) -> dict:
    from tidal.config import load_config
    from tidal.stages.check import check_train
    from tidal.stages.train import run_train
    from tidal.telemetry.rows import SUMMARY_KEY

    cfg = load_config(args.config, overrides(args, cell, seed))
    plan = check_train(cfg, fit=False).plan
    summary = run_train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    published = [r for r in rows if "perf/publish_mb" in r]
    final = [r for r in rows if "eval/logp_mismatch_mean" in r and SUMMARY_KEY not in r]
    return {
        "cell": cell,
        "seed": seed,
        "steps": cfg.train.steps,
        "before": summary["eval/accuracy_before"],
        "after": summary["eval/accuracy"],
        "publish_mb": statistics.fmean(r["perf/publish_mb"] for r in published),
        "publish_s": statistics.fmean(r["perf/publish_time_s"] for r in published),
        "mismatch": final[-1]["eval/logp_mismatch_mean"] if final else None,
        "plan_states_mb": sum(plan.trainer.get(k, 0) for k in ("gradients", "optimizer states")) / 2**20,
        "plan_peak_mb": plan.trainer_total / 2**20,
    }


def table(results: list[dict], cells: list[str]) -> str:
    lines = [
        "| cell | held-out before | after (mean ± std) | publish MB | publish s | logp mismatch "
        "| grads + optimizer states (plan) | trainer peak (plan) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        rs = [r for r in results if r["cell"] == cell]
        if not rs:
            continue
        after = [r["after"] for r in rs]
        std = statistics.stdev(after) if len(after) > 1 else 0.0
        mismatch = [r["mismatch"] for r in rs if r["mismatch"] is not None]
        lines.append(
            f"| {cell} ({len(rs)} seeds) | {statistics.fmean(r['before'] for r in rs):.1%} "
            f"| {statistics.fmean(after):.1%} ± {std:.1%} | {statistics.fmean(r['publish_mb'] for r in rs):.2f} "
            f"| {statistics.fmean(r['publish_s'] for r in rs):.3f} "
            f"| {statistics.fmean(mismatch) if mismatch else float('nan'):.1e} "
            f"| {rs[0]['plan_states_mb']:.1f} MB | {rs[0]['plan_peak_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--cells", default="full,lora,lora-attn")
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-lora"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cells = args.cells.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else []
    for seed in (int(s) for s in args.seeds.split(",")):
        for cell in cells:
            if any(r["cell"] == cell and r["seed"] == seed and r["steps"] == args.steps for r in results):
                continue
            results.append(run_cell(args, cell, seed))
            store.write_text(json.dumps(results, indent=2))
    print(table([r for r in results if r["steps"] == args.steps], cells))


if __name__ == "__main__":
    main()
