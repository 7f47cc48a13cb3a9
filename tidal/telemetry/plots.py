"""`tidal plot RUN_DIR [RUN_DIR ...]`: learning curves and time split of runs, as PNGs (matplotlib).

Each run directory gets `curves.png` (reward and held-out accuracy against step and against wall
time), `staleness.png` (the fraction of trained samples of each age) and `time_split.png` (where
each step's wall time went: waiting for rollout, training, publishing, evaluating). Several runs
also get one `comparison.png` of their curves side by side, in their common parent directory.
Everything is read from the run's `metrics.jsonl`.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tidal.telemetry.rows import Rows, read_rows, series, staleness_by_step, staleness_fractions, time_split  # noqa: E402


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
        figs = {
            "curves": draw_curves({label: rows}),
            "staleness": draw_staleness(rows),
            "time_split": draw_time_split(rows),
        }
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
