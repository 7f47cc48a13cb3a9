"""Staleness ablation: held-out accuracy and wall time for max_staleness x correction x seeds.

Each cell is `tidal train configs/quickstart.yaml` with `rollout.max_staleness=K`,
`algorithm.loss.correction=C` and `seed=S`, all from the same cached SFT warm start, run one after
the other on this machine. Corrections: `none` (PPO clip on pi/pi_old, ignoring that samples came
from older weights), `tis` (the quickstart's token-level truncated IS, c = 2) and `mask` (IcePop's
token-level masked IS, k in [0.5, 2]).

At max_staleness 0 every sample comes from the weights being trained, so pi_old = mu up to the
engine's numerical mismatch and the three corrections compute the same loss: the script runs that
row once per seed (with `tis`) and reports it for every correction; `--full-k0` runs all three.

The held-out set is `data.source.eval_size` problems (default 1000, not the quickstart's 200): one
run's accuracy near 70% has a standard error of sqrt(0.7 * 0.3 / n) = 1.45 points at n = 1000 (3.2
at n = 200), so the mean of 3 seeds carries 0.84 points of evaluation noise and the difference of
two cells about 1.2: a 3-point gap is 2.5 standard errors (every cell scores the same problems, so
the paired noise is smaller still). Seed-to-seed variation of training adds to that and is what the
reported std shows.

Results are appended to OUT/results.json after every run; rerunning the same command skips the
cells already there, so an interrupted ablation continues. The table and OUT/staleness_ablation.png
are written at the end.

    .venv/bin/python bench/staleness_ablation.py [--steps 150] [--seeds 1,2,3] [--staleness 0,1,2,4]
        [--corrections none,tis,mask] [--eval-size 1000] [--full-k0] [--out runs/bench-staleness]
        [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CORRECTIONS = {
    "none": "{type: none}",
    "tis": "{type: tis, level: token, c: 2.0}",
    "mask": "{type: mask, level: token, low: 0.5, high: 2.0}",
}


def run_cell(args: argparse.Namespace, staleness: int, correction: str, seed: int) -> dict:
    from tidal.config import load_config
    from tidal.monitor import SUMMARY_KEY
    from tidal.train import run_train

    name = f"k{staleness}-{correction}-s{seed}"
    cfg = load_config(args.config, [
        f"rollout.max_staleness={staleness}", f"algorithm.loss.correction={CORRECTIONS[correction]}",
        f"seed={seed}", f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
        f"data.source.eval_size={args.eval_size}", *args.overrides,
        f"name={name}", f"output_dir={args.out}", "monitor.wandb=disabled",
    ])  # fmt: skip
    start = time.perf_counter()
    summary = run_train(cfg)
    wall_s = time.perf_counter() - start
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/loss" in r]
    return {
        "cell": name, "staleness": staleness, "correction": correction, "seed": seed,
        "steps": cfg.train.steps, "wall_s": wall_s,
        "loop_s": sum(r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r),
        "before": summary["eval/accuracy_before"], "after": summary["eval/accuracy"],
        "staleness_mean": statistics.fmean(r["async/staleness_mean"] for r in trained),
        "dropped": summary["ledger/dropped_stale_groups"],
        "evals": [[r["step"], r["eval/accuracy"]] for r in rows if "eval/accuracy" in r and SUMMARY_KEY not in r],
    }  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: list[dict], staleness: list[int], corrections: list[str]) -> list[dict]:
    """One row per (staleness, correction): accuracy and wall-time mean and std over seeds."""
    rows = []
    on_policy = [r["after"] for r in results if r["staleness"] == 0]
    base = statistics.fmean(on_policy) if on_policy else float("nan")
    for k in staleness:
        for c in corrections:
            at_k = [r for r in results if r["staleness"] == k]
            cell = [r for r in at_k if r["correction"] == c] or (at_k if k == 0 else [])
            if not cell:
                continue
            acc, acc_std = mean_std([r["after"] for r in cell])
            loop, loop_std = mean_std([r["loop_s"] for r in cell])
            loop_median = statistics.median(r["loop_s"] for r in cell)
            rows.append({"staleness": k, "correction": c, "seeds": len(cell), "acc": acc, "acc_std": acc_std,
                         "delta": acc - base, "loop_s": loop, "loop_std": loop_std, "loop_median": loop_median,
                         "before": statistics.fmean(r["before"] for r in cell),
                         "shared": any(r["correction"] != c for r in cell)})  # fmt: skip
    return rows


def print_table(rows: list[dict], steps: int) -> None:
    print(f"\nheld-out accuracy after {steps} steps (mean ± std over seeds), train-loop time")
    print(f"{'staleness':>9} {'correction':>10} {'seeds':>5} {'accuracy':>14} {'vs on-policy':>12} {'loop s':>12} "
          f"{'median':>6}")  # fmt: skip
    for r in rows:
        note = "  (same runs for every correction)" if r["shared"] else ""
        print(f"{r['staleness']:>9} {r['correction']:>10} {r['seeds']:>5} {r['acc']:>7.1%} ± {r['acc_std']:>4.1%} "
              f"{r['delta'] * 100:>+11.1f}p {r['loop_s']:>6.0f} ± {r['loop_std']:>3.0f} "
              f"{r['loop_median']:>6.0f}{note}")  # fmt: skip


def plot(rows: list[dict], results: list[dict], corrections: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_time, ax_curve) = plt.subplots(1, 3, figsize=(15, 4.2))
    for c in corrections:
        mine = [r for r in rows if r["correction"] == c]
        ks = [r["staleness"] for r in mine]
        ax_acc.errorbar(ks, [100 * r["acc"] for r in mine], yerr=[100 * r["acc_std"] for r in mine],
                        marker="o", capsize=4, label=c)  # fmt: skip
        ax_time.errorbar(ks, [r["loop_s"] for r in mine], yerr=[r["loop_std"] for r in mine], marker="o",
                         capsize=4, label=c)  # fmt: skip
    on_policy = [r for r in rows if r["staleness"] == 0]
    if on_policy:
        base = 100 * on_policy[0]["acc"]
        ax_acc.axhspan(base - 3, base + 3, color="grey", alpha=0.15, label="on-policy ± 3 points")
    ax_acc.set(xlabel="max_staleness", ylabel="held-out accuracy (%)", title="accuracy after training")
    ax_time.set(xlabel="max_staleness", ylabel="train-loop seconds", title="wall time of the loop")
    for ax in (ax_acc, ax_time):
        ax.set_xticks(sorted({r["staleness"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend()
    for (k, c), style in _curve_cells(results).items():
        cell = [r for r in results if r["staleness"] == k and r["correction"] == c]
        by_step: dict[int, list[float]] = {}
        for r in cell:
            for step, acc in r["evals"]:
                by_step.setdefault(step, []).append(100 * acc)
        steps = sorted(by_step)
        means = [statistics.fmean(by_step[s]) for s in steps]
        ax_curve.plot(steps, means, marker=".", label=f"k{k} {c}", **style)
    ax_curve.set(xlabel="step", ylabel="held-out accuracy (%)", title="mean curve over seeds")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve_cells(results: list[dict]) -> dict[tuple[int, str], dict]:
    colors = {"none": "tab:blue", "tis": "tab:orange", "mask": "tab:green"}
    dashes = {0: "-", 1: ":", 2: "--", 4: "-."}
    cells = sorted({(r["staleness"], r["correction"]) for r in results})
    return {(k, c): {"color": "black" if k == 0 else colors.get(c), "linestyle": dashes.get(k, "-")} for k, c in cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--staleness", default="0,1,2,4")
    ap.add_argument("--corrections", default="none,tis,mask")
    ap.add_argument("--full-k0", action="store_true", help="run every correction at max_staleness 0 too")
    ap.add_argument("--out", default="runs/bench-staleness")
    ap.add_argument("overrides", nargs="*", help="further key=value overrides for every run")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    staleness = [int(k) for k in args.staleness.split(",")]
    corrections = args.corrections.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["staleness"], r["correction"], r["seed"]) for r in results}
    # Seed-major, so that whatever else the machine does during the ablation spreads over every cell.
    for seed in seeds:
        for k in staleness:
            for c in corrections if k > 0 or args.full_k0 else ["tis"]:
                if (k, c, seed) in done:
                    continue
                results.append(run_cell(args, k, c, seed))
                results_path.write_text(json.dumps(results, indent=2))
    rows = table(results, staleness, corrections)
    print_table(rows, args.steps)
    plot(rows, results, corrections, out / "staleness_ablation.png")
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print(f"\nplot: {out / 'staleness_ablation.png'}; per-run results: {results_path}")


if __name__ == "__main__":
    main()
