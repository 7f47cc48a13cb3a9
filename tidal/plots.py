"""`tidal plot RUN_DIR [RUN_DIR ...]`: learning curves and time split of runs, as PNGs (matplotlib).

Each run directory gets `curves.png` (reward and held-out accuracy against step and against wall
time), `staleness.png` (the fraction of trained samples of each age) and `time_split.png` (where
each step's wall time went: waiting for rollout, training, publishing, evaluating). Several runs
also get one `comparison.png` of their curves side by side, in their common parent directory.
Everything is read from the run's `metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tidal.config import ConfigError  # noqa: E402
from tidal.monitor import SUMMARY_KEY  # noqa: E402

Rows = list[dict[str, Any]]
TIME_SPLIT = {"perf/rollout_wall_s": "waiting for rollout", "perf/train_wall_s": "training",
              "perf/sync_wall_s": "publishing weights", "perf/eval_wall_s": "evaluating"}  # fmt: skip


def read_rows(run_dir: Path) -> Rows:
    """The rows of a run's metrics.jsonl, each with `wall_s`: seconds since the run's first row."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; name a run directory (runs/<name>)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{path} is empty: the run logged nothing yet")
    t0 = rows[0]["time"]
    return [{**r, "wall_s": r["time"] - t0} for r in rows]


def series(rows: Rows, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of every row that has `key` (the run's final summary row, logged at the last step
    again, is left out). Held-out metrics are placed at the policy version they measured
    (`eval/version`): an evaluation runs beside training and is logged at the step it ends."""

    def at(r: dict[str, Any]) -> float:
        if x != "step":
            return r["wall_s"]
        return r.get("eval/version", r["step"]) if key.startswith("eval/") else r["step"]

    points = {at(r): r[key] for r in rows if key in r and SUMMARY_KEY not in r}
    return list(points), list(points.values())


def draw_curves(runs: dict[str, Rows]) -> Figure:
    """Reward and held-out accuracy against step (left) and wall time (right), one line per run."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    for name, rows in runs.items():
        for row, key in enumerate(("reward/mean", "eval/accuracy")):
            for col, x in enumerate(("step", "wall_s")):
                xs, ys = series(rows, key, x)
                axes[row, col].plot(xs, ys, marker="o" if key.startswith("eval/") else None, ms=3, label=name)
    for row, title in enumerate(("reward (train batches)", "held-out accuracy")):
        for col, xlabel in enumerate(("step", "wall time (s)")):
            ax = axes[row, col]
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def staleness_fractions(rows: Rows) -> tuple[list[int], list[float], int]:
    """(ages, mean over trained steps of the fraction of samples of each age, trained steps); an
    age is trainer version - sample version."""
    ages = sorted({int(k.rsplit("_", 1)[1]) for r in rows for k in r if k.startswith("async/staleness_frac_")})
    trained = [r for r in rows if "async/staleness_frac_0" in r]
    means = [sum(r.get(f"async/staleness_frac_{a}", 0.0) for r in trained) / max(len(trained), 1) for a in ages]
    return ages, means, len(trained)


def time_split(rows: Rows) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, seconds of each step by where they went, keyed by the part's label)."""
    steps = [r for r in rows if "perf/step_time_s" in r]
    return [r["step"] for r in steps], {label: [r.get(key, 0.0) for r in steps] for key, label in TIME_SPLIT.items()}


def staleness_by_step(rows: Rows) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) of the samples' mean and max age per trained step and of the bound the driver
    dispatched under (`async/staleness_bound`, which the adaptive bound moves), keyed by label."""
    keys = {"mean age": "async/staleness_mean", "max age": "async/staleness_max", "bound": "async/staleness_bound"}
    out = {}
    for label, key in keys.items():
        logged = [r for r in rows if key in r and "async/staleness_frac_0" in r]
        if logged:
            out[label] = ([r["step"] for r in logged], [r[key] for r in logged])
    return out


def draw_staleness(rows: Rows) -> Figure:
    """Left: the mean over trained steps of the fraction of samples of each age (trainer version -
    sample version). Right: the mean and max age and the staleness bound, step by step."""
    ages, means, trained = staleness_fractions(rows)
    fig, (ax, ax_steps) = plt.subplots(1, 2, figsize=(12, 4))
    ax.bar(ages, means, label="fraction of samples")
    ax.set_xticks(ages)
    ax.set_xlabel("staleness (policy versions)")
    ax.set_ylabel("fraction of trained samples")
    ax.set_title(f"staleness over {trained} trained steps")
    ax.legend()
    for label, (steps, values) in staleness_by_step(rows).items():
        ax_steps.plot(steps, values, label=label, drawstyle="steps-post" if label == "bound" else "default")
    ax_steps.set_xlabel("step")
    ax_steps.set_ylabel("policy versions")
    ax_steps.set_title("staleness by step")
    ax_steps.grid(alpha=0.3)
    ax_steps.legend()
    fig.tight_layout()
    return fig


def draw_time_split(rows: Rows) -> Figure:
    """Each step's wall time, stacked by where it went."""
    fig, ax = plt.subplots(figsize=(9, 4))
    steps, parts = time_split(rows)
    bottom = [0.0] * len(steps)
    for label, heights in parts.items():
        ax.bar(steps, heights, bottom=bottom, width=1.0, label=label)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.set_title("where each step's wall time went")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: list[Path]) -> list[Path]:
    """Write every run's PNGs (and a comparison of several); returns the files written."""
    names = [Path(d).name for d in run_dirs]
    labels = [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs, strict=True)]
    runs = {label: read_rows(Path(d)) for label, d in zip(labels, run_dirs, strict=True)}
    written = []
    for d, (label, rows) in zip(run_dirs, runs.items(), strict=True):
        figs = {"curves": draw_curves({label: rows}), "staleness": draw_staleness(rows),
                "time_split": draw_time_split(rows)}  # fmt: skip
        for name, fig in figs.items():
            written.append(_save(fig, Path(d) / f"{name}.png"))
    if len(run_dirs) > 1:
        parent = Path(os.path.commonpath([Path(d).resolve() for d in run_dirs]))
        written.append(_save(draw_curves(runs), parent / "comparison.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
