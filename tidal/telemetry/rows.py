"""The row format of a run's `metrics.jsonl`, one place for every reader: the terminal and wandb
sinks (`monitor`), `tidal plot` (`plots`), the tests and benchmarks. A row is one step's metrics
(`step`, `time`, and a float per key); the run's last row is its summary (`SUMMARY_KEY`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tidal.config import ConfigError

SUMMARY_KEY = "ledger/taken_groups"
"""A key only the run's final summary row has (that row repeats the last step's values)."""

Rows = list[dict[str, Any]]
TIME_SPLIT = {
    "perf/rollout_wall_s": "waiting for rollout",
    "perf/train_wall_s": "training",
    "perf/sync_wall_s": "publishing weights",
    "perf/eval_wall_s": "evaluating",
}


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
