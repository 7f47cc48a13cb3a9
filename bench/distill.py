"""On-policy distillation against RL alone, from the same start (issue 32): the quickstart's SFT warm
start distilled from a teacher the quickstart's RL produced, beside the quickstart's RL from the
same warm start, over seeds.

The teacher is `tidal train configs/quickstart.yaml` (300 GRPO steps, seed 0) run once into
`--teacher-dir` (reused when its checkpoint is there). Every cell is `tidal train
configs/quickstart.yaml` with `seed=S`, `train.steps=--steps` (`--rl-steps` for RL alone, by default the
quickstart's 300, the teacher's own recipe) and a held-out evaluation every `--eval-every` steps on
`--eval-size` problems, run one after the other on this machine:

- `distill`: `algorithm.distill={teacher: <teacher>, coef: --coef, reward_coef: 0}`, the teacher's
  per-token signal alone (the arithmetic reward still scores every sample, for the accuracy);
- `distill+reward`: the same with `reward_coef: 1`, the teacher's signal added to GRPO's advantage;
- `rl`: the quickstart as it is (GRPO on the reward).

The teacher is scored on the same held-out problems (`tidal eval`, greedy, as in a run). For each run
the table gives the held-out accuracy at the end, the best one, and the first step whose accuracy is
within `--within` of the teacher's ("-" when none is); OUT/distill_curves.png draws the held-out
accuracy against the step. Results are appended to OUT/results.json
after every run; rerunning the same command skips the runs already there and resumes one that was
stopped midway.

    .venv/bin/python bench/distill.py [--steps 150] [--rl-steps 300] [--seeds 1,2,3] [--cells distill,rl]
        [--eval-every 10] [--eval-size 1000] [--within 0.02] [--coef 1] [--teacher-dir /tmp/teacher]
        [--out runs/bench-distill] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CONFIG = "configs/quickstart.yaml"
CELLS = {
    "distill": ["algorithm.distill.reward_coef=0.0"],
    "distill+reward": ["algorithm.distill.reward_coef=1.0"],
    "rl": [],
}


def teacher(args: argparse.Namespace) -> tuple[Path, float]:
    """The teacher's checkpoint (trained by the quickstart's RL when absent) and its held-out accuracy
    on this benchmark's held-out problems."""
    from tidal.config import load_config
    from tidal.stages.eval import run_eval
    from tidal.stages.train import run_train

    cfg = load_config(CONFIG, [f"output_dir={args.teacher_dir}", "monitor.wandb=disabled"])
    checkpoint = cfg.run_dir / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        run_train(cfg)
    scored = load_config(CONFIG, [f"data.source.eval_size={args.eval_size}", f"eval.num_samples={args.eval_size}"])
    return checkpoint, run_eval(scored, str(checkpoint))["eval/accuracy"]


def run_cell(args: argparse.Namespace, cell: str, seed: int, checkpoint: Path) -> dict:
    from tidal.config import load_config
    from tidal.stages.train import run_train
    from tidal.telemetry.rows import SUMMARY_KEY

    name = run_name(cell, seed, args.coef)
    resume = (args.out / name / "checkpoints").is_dir()  # a run stopped midway (SIGTERM) goes on
    distill = [f"algorithm.distill.teacher={checkpoint}", f"algorithm.distill.coef={args.coef}"]
    distill = distill if cell.startswith("distill") else []
    cfg = load_config(
        CONFIG,
        [
            *distill,
            *CELLS[cell],
            f"seed={seed}",
            f"train.steps={args.rl_steps if cell == 'rl' else args.steps}",
            f"train.eval_every={args.eval_every}",
            f"data.source.eval_size={args.eval_size}",
            f"eval.num_samples={args.eval_size}",
            *args.overrides,
            f"name={name}",
            f"output_dir={args.out}",
            "monitor.wandb=disabled",
            f"train.resume={str(resume).lower()}",
        ],
    )
    start = time.perf_counter()
    summary = run_train(cfg)
    if "stopped_at_step" in summary:
        raise SystemExit(f"{name} stopped at step {summary['stopped_at_step']}; rerun the command to go on")
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [r["distill/reverse_kl"] for r in rows if "distill/reverse_kl" in r and SUMMARY_KEY not in r]
    return {
        "run": name,
        "cell": name.rsplit("-s", 1)[0],  # with its coefficient
        "seed": seed,
        "wall_s": time.perf_counter() - start,
        "loop_s": summary.get("perf/loop_s", 0.0),
        "before": summary["eval/accuracy_before"],
        "after": summary["eval/accuracy"],
        "evals": [[r["step"], r["eval/accuracy"]] for r in rows if "eval/accuracy" in r and SUMMARY_KEY not in r],
        "reverse_kl_first_last": [statistics.fmean(kl[:10]), statistics.fmean(kl[-10:])] if kl else None,
    }


def run_name(cell: str, seed: int, coef: float) -> str:
    """`distill-s1`, or `distill-c3-s1` for a coefficient other than 1 (RL's runs have none)."""
    tag = f"-c{coef:g}" if cell.startswith("distill") and coef != 1.0 else ""
    return f"{cell}{tag}-s{seed}"


def first_within(evals: list[list[float]], target: float) -> int | None:
    return next((int(step) for step, acc in evals if acc >= target), None)


def table(results: list[dict], teacher_acc: float, within: float) -> str:
    target = teacher_acc - within
    lines = [
        f"teacher held-out accuracy {teacher_acc:.1%}; target {target:.1%} (within {within:.0%})",
        f"{'run':<20} {'before':>7} {'after':>7} {'best':>7} {'step to target':>15} {'rev KL first->last 10':>22}",
    ]
    for r in results:
        best = max(acc for _, acc in r["evals"])
        step = first_within(r["evals"], target)
        reached = str(step) if step is not None else "-"
        kl = r["reverse_kl_first_last"]
        lines.append(
            f"{r['run']:<20} {r['before']:>7.1%} {r['after']:>7.1%} {best:>7.1%} {reached:>15} "
            f"{f'{kl[0]:.3f} -> {kl[1]:.3f}' if kl else '':>22}"
        )
    for cell in dict.fromkeys(r["cell"] for r in results):
        runs = [r for r in results if r["cell"] == cell]
        steps = [first_within(r["evals"], target) for r in runs]
        reached = [s for s in steps if s is not None]
        lines.append(
            f"{cell}: after {statistics.fmean(r['after'] for r in runs):.1%} (mean of {len(runs)}), "
            f"target reached by {len(reached)}/{len(runs)}"
            + (f", at steps {reached} (mean {statistics.fmean(reached):.0f})" if reached else "")
        )
    return "\n".join(lines)


def plot(results: list[dict], teacher_acc: float, within: float, path: Path) -> None:
    """Held-out accuracy against the step, each cell's mean over its seeds (their range shaded),
    with the teacher's accuracy and the target below it."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for cell in dict.fromkeys(r["cell"] for r in results):
        runs = [np.array(r["evals"]).T for r in results if r["cell"] == cell]
        # An evaluation is logged at the step it lands, which differs between runs: each run's curve
        # is interpolated onto one grid of steps.
        grid = np.arange(0, min(int(steps[-1]) for steps, _ in runs) + 1, 5)
        accs = np.stack([np.interp(grid, steps, acc) for steps, acc in runs])
        ax.plot(grid, accs.mean(0), label=f"{cell} ({len(runs)} seeds)")
        ax.fill_between(grid, accs.min(0), accs.max(0), alpha=0.2)
    ax.axhline(teacher_acc, color="black", linestyle="--", linewidth=1, label=f"teacher {teacher_acc:.1%}")
    ax.axhline(teacher_acc - within, color="grey", linestyle=":", linewidth=1, label=f"teacher - {within:.0%}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rl-steps", type=int, default=300)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--cells", default="distill,rl")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--within", type=float, default=0.02)
    p.add_argument("--coef", type=float, default=1.0, help="algorithm.distill.coef of the distill cells")
    p.add_argument("--teacher-dir", default="/tmp/teacher")
    p.add_argument("--out", type=Path, default=Path("runs/bench-distill"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    state = json.loads(saved.read_text()) if saved.is_file() else {"runs": []}
    if "teacher_accuracy" not in state:
        checkpoint, acc = teacher(args)
        state.update(teacher=str(checkpoint), teacher_accuracy=acc)
        saved.write_text(json.dumps(state, indent=1))
    done = {r["run"] for r in state["runs"]}
    for seed in (int(s) for s in args.seeds.split(",")):
        for cell in args.cells.split(","):
            if run_name(cell, seed, args.coef) in done:
                continue
            state["runs"].append(run_cell(args, cell, seed, Path(state["teacher"])))
            saved.write_text(json.dumps(state, indent=1))
    print(table(state["runs"], state["teacher_accuracy"], args.within))
    plot(state["runs"], state["teacher_accuracy"], args.within, args.out / "distill_curves.png")
    print(f"plot: {args.out / 'distill_curves.png'}")


if __name__ == "__main__":
    main()
