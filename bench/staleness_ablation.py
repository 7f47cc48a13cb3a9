"""Staleness ablation: held-out accuracy and wall time for max_staleness x correction x seeds.

Each cell is `tidal train configs/quickstart.yaml` with `rollout.max_staleness=K`, a correction and
`seed=S`, all from the same cached SFT warm start, run one after the other on this machine.
Corrections: `none` (PPO clip on pi/pi_old, ignoring that samples came from older weights), `tis`
(the quickstart's token-level truncated IS, c = 2), `mask` (IcePop's token-level masked IS, k in
[0.5, 2]), `m2po` (tis weights with M2PO's second-moment trust region, tau = 0.04, instead of the
clip) and `adaptive` (tis with `rollout.adaptive_staleness: {m2_target: 0.1}`: K is then the hard
limit and the bound the driver dispatches under follows the measured drift, from 1 up to K).

At max_staleness 0 every sample comes from the weights being trained, so pi_old = mu up to the
engine's numerical mismatch and the corrections compute the same loss: the script runs that row
once per seed (with `tis`) and reports it for every correction; `--full-k0` runs all of them.
(`adaptive` at K = 1 is `tis` at 1: its floor is 1.)

The held-out set is `data.source.eval_size` problems (default 1000, not the quickstart's 200): one
run's accuracy near 70% has a standard error of sqrt(0.7 * 0.3 / n) = 1.45 points at n = 1000 (3.2
at n = 200), so the mean of 3 seeds carries 0.84 points of evaluation noise and the difference of
two cells about 1.2: a 3-point gap is 2.5 standard errors (every cell scores the same problems, so
the paired noise is smaller still). Seed-to-seed variation of training adds to that and is what the
reported std shows.

Time to accuracy: each cell's mean curve (held-out accuracy and loop seconds, evaluations left out,
averaged over seeds at each evaluation) is read for the loop time at which it first reaches the
on-policy runs' mean final accuracy (linear between evaluations); the speed-up is the on-policy
time over that.

Results are appended to OUT/results.json after every run; rerunning the same command skips the
cells already there, so an interrupted ablation continues. The table and OUT/staleness_ablation.png
are written at the end.

    .venv/bin/python bench/staleness_ablation.py [--steps 150] [--seeds 1,2,3] [--staleness 0,1,2,4]
        [--corrections none,tis,mask] [--cells k0-tis,k4-adaptive,...] [--eval-size 1000] [--full-k0]
        [--out runs/bench-staleness] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TIS = "algorithm.loss.correction={type: tis, level: token, c: 2.0}"
CORRECTIONS = {
    "none": ["algorithm.loss.correction={type: none}"],
    "tis": [TIS],
    "mask": ["algorithm.loss.correction={type: mask, level: token, low: 0.5, high: 2.0}"],
    "m2po": [TIS, "algorithm.loss.trust_region={type: m2po, threshold: 0.04}"],
    "adaptive": [TIS, "rollout.adaptive_staleness={m2_target: 0.1, min_staleness: 1}"],
}


def run_cell(args: argparse.Namespace, staleness: int, correction: str, seed: int) -> dict:
    from tidal.config import load_config
    from tidal.stages.train import run_train
    from tidal.telemetry.rows import SUMMARY_KEY

    name = f"k{staleness}-{correction}-s{seed}"
    cfg = load_config(
        args.config,
        [
            f"rollout.max_staleness={staleness}",
            *CORRECTIONS[correction],
            f"seed={seed}",
            f"train.steps={args.steps}",
            f"train.eval_every={args.eval_every}",
            f"data.source.eval_size={args.eval_size}",
            *args.overrides,
            f"name={name}",
            f"output_dir={args.out}",
            "monitor.wandb=disabled",
        ],
    )
    start = time.perf_counter()
    summary = run_train(cfg)
    wall_s = time.perf_counter() - start
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/loss" in r]
    return {
        "cell": name,
        "staleness": staleness,
        "correction": correction,
        "seed": seed,
        "run_dir": str(cfg.run_dir),
        "steps": cfg.train.steps,
        "wall_s": wall_s,
        "loop_s": sum(r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r),
        "before": summary["eval/accuracy_before"],
        "after": summary["eval/accuracy"],
        "staleness_mean": statistics.fmean(r["async/staleness_mean"] for r in trained),
        "bound_mean": statistics.fmean(r.get("async/staleness_bound", staleness) for r in trained),
        "dropped": summary["ledger/dropped_stale_groups"],
        "evals": [[r["step"], r["eval/accuracy"]] for r in rows if "eval/accuracy" in r and SUMMARY_KEY not in r],
    }


def eval_times(result: dict, out: Path) -> list[tuple[int, float, float]]:
    """(step, held-out accuracy, seconds of the loop up to that step, evaluations left out) per
    evaluation of one run, read back from its metrics.jsonl."""
    from tidal.telemetry.rows import SUMMARY_KEY

    path = Path(result.get("run_dir", out / result["cell"])) / "metrics.jsonl"
    spent, points = 0.0, []
    for row in (json.loads(line) for line in path.read_text().splitlines()):
        spent += row.get("perf/step_time_s", 0.0) - row.get("perf/eval_wall_s", 0.0)
        if "eval/accuracy" in row and SUMMARY_KEY not in row:
            points.append((row["step"], row["eval/accuracy"], spent))
    return points


def mean_curve(cell: list[dict], out: Path) -> list[tuple[int, float, float]]:
    """(step, accuracy, seconds) averaged over the seeds of one cell, at the steps all of them evaluated."""
    curves = [eval_times(r, out) for r in cell]
    steps = sorted(set.intersection(*({s for s, _, _ in c} for c in curves)))
    by = [{s: (a, t) for s, a, t in c} for c in curves]
    return [(s, statistics.fmean(b[s][0] for b in by), statistics.fmean(b[s][1] for b in by)) for s in steps]


def time_to(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Loop seconds at which the mean curve first reaches `target`, interpolated linearly between the
    evaluations around the crossing; None if it never does."""
    prev = None
    for _, acc, t in curve:
        if acc >= target:
            if prev is None or prev[0] >= target:
                return t
            return prev[1] + (t - prev[1]) * (target - prev[0]) / (acc - prev[0])
        prev = (acc, t)
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: list[dict], staleness: list[int], corrections: list[str], out: Path) -> list[dict]:
    """One row per (staleness, correction): accuracy and wall-time mean and std over seeds, and the
    loop time its mean curve takes to reach the on-policy runs' mean final accuracy."""
    rows = []
    on_policy = [r for r in results if r["staleness"] == 0]
    base = statistics.fmean(r["after"] for r in on_policy) if on_policy else float("nan")
    for k in staleness:
        for c in corrections:
            at_k = [r for r in results if r["staleness"] == k]
            cell = [r for r in at_k if r["correction"] == c] or (at_k if k == 0 else [])
            if not cell:
                continue
            acc, acc_std = mean_std([r["after"] for r in cell])
            loop, loop_std = mean_std([r["loop_s"] for r in cell])
            loop_median = statistics.median(r["loop_s"] for r in cell)
            rows.append(
                {
                    "staleness": k,
                    "correction": c,
                    "seeds": len(cell),
                    "acc": acc,
                    "acc_std": acc_std,
                    "delta": acc - base,
                    "loop_s": loop,
                    "loop_std": loop_std,
                    "loop_median": loop_median,
                    "before": statistics.fmean(r["before"] for r in cell),
                    "staleness_mean": statistics.fmean(r["staleness_mean"] for r in cell),
                    "time_to_on_policy": time_to(mean_curve(cell, out), base),
                    "shared": any(r["correction"] != c for r in cell),
                }
            )
    return rows


def print_table(rows: list[dict], steps: int) -> None:
    print(
        f"\nheld-out accuracy after {steps} steps (mean ± std over seeds), train-loop time (evaluations left "
        "out), mean staleness of the trained samples, and loop seconds until the mean curve reaches the "
        "on-policy final accuracy (-: not within the run)"
    )
    print(
        f"{'staleness':>9} {'correction':>10} {'seeds':>5} {'accuracy':>14} {'vs on-policy':>12} {'loop s':>12} "
        f"{'median':>6} {'mean age':>8} {'to on-policy':>12}"
    )
    on_policy = next((r["time_to_on_policy"] for r in rows if r["staleness"] == 0), None)
    for r in rows:
        note = "  (same runs for every correction)" if r["shared"] else ""
        reach = r["time_to_on_policy"]
        speedup = f" {on_policy / reach:.2f}x" if reach and on_policy else ""
        reached = f"{reach:>6.0f}{speedup}" if reach is not None else "-"
        print(
            f"{r['staleness']:>9} {r['correction']:>10} {r['seeds']:>5} {r['acc']:>7.1%} ± {r['acc_std']:>4.1%} "
            f"{r['delta'] * 100:>+11.1f}p {r['loop_s']:>6.0f} ± {r['loop_std']:>3.0f} "
            f"{r['loop_median']:>6.0f} {r['staleness_mean']:>8.2f} {reached:>12}{note}"
        )


COLORS = {"none": "tab:blue", "tis": "tab:orange", "mask": "tab:green", "m2po": "tab:purple", "adaptive": "tab:red"}


def plot(rows: list[dict], results: list[dict], corrections: list[str], curves: list[str], out: Path) -> None:
    """OUT/staleness_ablation.png: accuracy and loop time against the bound, and the mean held-out
    curves (on-policy and the `curves` corrections) against steps and against loop seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_time, ax_curve, ax_clock) = plt.subplots(1, 4, figsize=(20, 4.2))
    for c in corrections:
        mine = [r for r in rows if r["correction"] == c]
        ks = [r["staleness"] for r in mine]
        ax_acc.errorbar(
            ks,
            [100 * r["acc"] for r in mine],
            yerr=[100 * r["acc_std"] for r in mine],
            marker="o",
            capsize=4,
            label=c,
            color=COLORS.get(c),
        )
        ax_time.errorbar(
            ks,
            [r["loop_s"] for r in mine],
            yerr=[r["loop_std"] for r in mine],
            marker="o",
            capsize=4,
            label=c,
            color=COLORS.get(c),
        )
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
        if k > 0 and c not in curves:
            continue
        curve = mean_curve([r for r in results if r["staleness"] == k and r["correction"] == c], out)
        ax_curve.plot([s for s, _, _ in curve], [100 * a for _, a, _ in curve], marker=".", label=f"k{k} {c}", **style)
        ax_clock.plot([t for _, _, t in curve], [100 * a for _, a, _ in curve], marker=".", label=f"k{k} {c}", **style)
    ax_curve.set(xlabel="step", ylabel="held-out accuracy (%)", title="mean curve over seeds")
    ax_clock.set(
        xlabel="train-loop seconds (evaluations left out)",
        ylabel="held-out accuracy (%)",
        title="mean curve over seeds, against time",
    )
    if on_policy:
        ax_clock.axhline(base, color="grey", linewidth=0.8, label="on-policy final")
    for ax in (ax_curve, ax_clock):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "staleness_ablation.png", dpi=110)
    plt.close(fig)


def _curve_cells(results: list[dict]) -> dict[tuple[int, str], dict]:
    dashes = {0: "-", 1: ":", 2: "--", 4: "-.", 8: (0, (5, 1, 1, 1, 1, 1))}
    cells = sorted({(r["staleness"], r["correction"]) for r in results})
    return {(k, c): {"color": "black" if k == 0 else COLORS.get(c), "linestyle": dashes.get(k, "-")} for k, c in cells}


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
    ap.add_argument("--curves", help="corrections whose mean curves are drawn (default: all)")
    ap.add_argument("--cells", help="only these cells, e.g. k0-tis,k1-tis,k4-adaptive (instead of the grid)")
    ap.add_argument("--out", default="runs/bench-staleness")
    ap.add_argument("overrides", nargs="*", help="further key=value overrides for every run")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    staleness = [int(k) for k in args.staleness.split(",")]
    corrections = args.corrections.split(",")
    cells = (
        [(int(k), c) for k, c in (cell[1:].split("-") for cell in args.cells.split(","))]
        if args.cells
        else [(k, c) for k in staleness for c in (corrections if k > 0 or args.full_k0 else ["tis"])]
    )
    if args.cells:
        staleness = sorted({k for k, _ in cells})
        corrections = list(dict.fromkeys(c for _, c in cells))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["staleness"], r["correction"], r["seed"]) for r in results}
    # Seed-major, so that whatever else the machine does during the ablation spreads over every cell.
    for seed in seeds:
        for k, c in cells:
            if (k, c, seed) in done:
                continue
            results.append(run_cell(args, k, c, seed))
            results_path.write_text(json.dumps(results, indent=2))
    rows = table(results, staleness, corrections, out)
    print_table(rows, args.steps)
    plot(rows, results, corrections, args.curves.split(",") if args.curves else corrections, out)
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print(f"\nplot: {out / 'staleness_ablation.png'}; per-run results: {results_path}")


if __name__ == "__main__":
    main()
