"""Metrics sinks behind one small interface: wandb, a jsonl file in the run directory, the terminal.

Every row is logged against the trainer's step; a step may have more than one row (an evaluation
that ended beside a newer one, the final summary).
Keys are namespaced (`train/`, `eval/`, `rollout/`, ...).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tidal.config import MonitorConfig
from tidal.telemetry.rows import SUMMARY_KEY

log = logging.getLogger(__name__)


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        self._f.write(json.dumps(row, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ConsoleSink:
    """The terminal. On a TTY: a progress bar (steps, elapsed, ETA) and a panel of the numbers that
    matter, refreshed in place (rich). Otherwise (CI, a log file): one plain line, without ANSI
    codes, every `log_every` steps and at the last."""

    KEYS = {
        "reward/mean": "reward",
        "rollout/accuracy": "acc",
        "eval/accuracy": "eval_acc",
        "train/loss": "loss",
        "train/grad_norm": "grad_norm",
        "train/entropy": "entropy",
        "offpolicy/is_weight_mean": "is_w",
        "rollout/response_length": "len",
        "train/lr": "lr",
        "rollout/logp_mismatch_mean": "mismatch",
        "distill/reverse_kl": "rev_kl",
        "perf/step_time_s": "step_s",
        "eval/accuracy_before": "eval_acc_before",
        "eval/probe_accuracy": "probe_acc",
    }
    SPLIT = {
        "perf/rollout_wall_s": "rollout wait",
        "perf/train_wall_s": "train",
        "perf/sync_wall_s": "publish",
        "perf/eval_wall_s": "eval",
    }
    COUNTS = {
        "async/dropped_stale_samples": "dropped as stale",
        "reward/failed": "failed reward calls",
        "rollout/filtered_zero_variance_groups": "zero-variance groups",
    }

    def __init__(self, total_steps: int | None = None, log_every: int = 10, console: Console | None = None) -> None:
        self.total = total_steps
        self.log_every = log_every
        self.console = console or Console()
        self.last: dict[str, float] = {}
        self.best_eval: float | None = None
        self.counts: dict[str, float] = dict.fromkeys(self.COUNTS, 0.0)
        self.live: Live | None = None
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]step"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("elapsed"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("run", total=total_steps)
            self.live = Live(self._view(), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.last.update(metrics)
        if "eval/accuracy" in metrics:
            acc = metrics["eval/accuracy"]
            self.best_eval = acc if self.best_eval is None else max(self.best_eval, acc)
        for k in self.COUNTS:
            self.counts[k] += metrics.get(k, 0.0)
        if self.live is not None:
            self.progress.update(self.task, completed=step)
            self.live.update(self._view())
        elif step % self.log_every == 0 or step == self.total or step == 0:
            shown = [f"{label}={_fmt(metrics[k])}" for k, label in self.KEYS.items() if k in metrics]
            if not shown or SUMMARY_KEY in metrics:  # nothing to say, or the final summary (the caller prints it)
                return
            of = f"/{self.total}" if self.total else ""
            self.console.print(f"[step {step}{of}] " + "  ".join(shown), markup=False, highlight=False, soft_wrap=True)

    def _view(self) -> Group:
        m = self.last
        rows: list[tuple[str, float | str | None]] = [
            ("reward", m.get("reward/mean")),
            ("held-out accuracy", m.get("eval/accuracy")),
            ("best held-out accuracy", self.best_eval),
            ("staleness mean / max", _pair(m, "async/staleness_mean", "async/staleness_max")),
            ("staleness bound", _count(m.get("async/staleness_bound"))),
            ("rollout tokens/s", _count(m.get("perf/rollout_tokens_per_s"))),
            ("train tokens/s", _count(m.get("perf/train_tokens_per_s"))),
        ]
        step_s = m.get("perf/step_time_s")
        if step_s:
            split = "  ".join(f"{label} {m.get(k, 0.0) / step_s:.0%}" for k, label in self.SPLIT.items())
            rows.append(("time split", split))
        rows += [(label, _count(self.counts[k])) for k, label in self.COUNTS.items()]
        table = Table.grid(padding=(0, 2))
        table.add_column(style="dim")
        table.add_column(justify="right")
        for label, value in rows:
            if value is not None:
                table.add_row(label, value if isinstance(value, str) else _fmt(float(value)))
        return Group(self.progress, table)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


class WandbSink:
    """wandb, with the charts of `tidal plot`: every row against the trainer's step (the metric
    `step`: each row is a wandb row of its own, so two rows of one step, such as two evaluations
    that ended together, are both kept); reward and held-out accuracy also against wall time
    (`by_time/`, x axis `perf/elapsed_s`, seconds since the first row); at the end, the staleness
    histogram and the per-step time split as wandb charts drawn from the run's metrics.jsonl (the
    data of `tidal plot`'s PNGs)."""

    BY_TIME = {"reward/mean": "by_time/reward", "eval/accuracy": "by_time/eval_accuracy"}

    def __init__(
        self, cfg: MonitorConfig, run_dir: Path, name: str, config: dict[str, Any], run_id: str | None = None
    ) -> None:
        import wandb

        mode = wandb_mode(cfg.wandb)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.run = wandb.init(
            project=cfg.project,
            name=name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.define_metric("step", hidden=True)
        self.run.define_metric("perf/elapsed_s", hidden=True)
        self.run.define_metric("by_time/*", step_metric="perf/elapsed_s")
        self.run.define_metric("eval/accuracy", step_metric="step", summary="max,last")
        self.prefixes = {"by_time"}  # namespaces whose x axis is set
        self.t0: float | None = None
        self.last_step = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.t0 = time.time() if self.t0 is None else self.t0
        by_time = {new: metrics[key] for key, new in self.BY_TIME.items() if key in metrics}
        if by_time and SUMMARY_KEY not in metrics:
            metrics = {**metrics, **by_time, "perf/elapsed_s": time.time() - self.t0}
        for prefix in {k.split("/")[0] for k in metrics if "/" in k} - self.prefixes:
            self.run.define_metric(f"{prefix}/*", step_metric="step")
            self.prefixes.add(prefix)
        self.run.log({**metrics, "step": step})
        self.last_step = step

    def close(self) -> None:
        try:
            self._log_charts()
        finally:
            self.run.finish()

    def _log_charts(self) -> None:
        import wandb

        from tidal.telemetry.rows import read_rows, staleness_fractions, time_split

        if not (self.run_dir / "metrics.jsonl").is_file() or self.t0 is None:
            return
        rows = read_rows(self.run_dir)
        charts = {}
        ages, fractions, trained = staleness_fractions(rows)
        if ages:
            table = wandb.Table(
                columns=["staleness", "fraction of trained samples"],
                data=[[a, f] for a, f in zip(ages, fractions, strict=True)],
            )
            charts["charts/staleness"] = wandb.plot.bar(
                table, "staleness", "fraction of trained samples", title=f"staleness over {trained} trained steps"
            )
        steps, parts = time_split(rows)
        if steps:
            charts["charts/time_split"] = wandb.plot.line_series(
                xs=steps,
                ys=list(parts.values()),
                keys=list(parts),
                title="where each step's wall time went (s)",
                xname="step",
            )
        if charts:
            self.run.log({**charts, "step": self.last_step})


def wandb_mode(requested: str) -> str:
    """The wandb mode to run in: `requested`, except `online` without any credential becomes `offline`
    (a run that cannot log in would otherwise stop at `wandb.init`).

    Credentials are looked up the way `wandb.init` does, without the network: WANDB_API_KEY, an
    identity token file, the netrc entry `wandb login` writes, the api_key of the wandb settings."""
    if requested != "online" or _wandb_credential_found():
        return requested
    log.warning(
        "monitor.wandb=online but wandb finds no credential (run `wandb login` or set WANDB_API_KEY); "
        "logging offline instead"
    )
    return "offline"


def _wandb_credential_found() -> bool:
    # wandb's own lookup (wandb.sdk.lib.wbauth, as in wandb 0.31); wandb.login would also ask the server.
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    auth = wbauth.authenticate_session(host=host, source="tidal", prompt=False, update_session=False)
    return auth is not None


def _pair(m: dict[str, float], mean: str, most: str) -> str | None:
    return f"{m[mean]:.2f} / {m[most]:.0f}" if mean in m and most in m else None


def _count(x: float | None) -> str | None:
    return None if x is None else f"{x:,.0f}"


def _fmt(x: float) -> str:
    if isinstance(x, float) and (math.isnan(x) or abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3)):
        return f"{x:.3g}"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


class Monitor:
    """Fans one metrics row out to every sink."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    @classmethod
    def for_run(
        cls,
        cfg: MonitorConfig,
        run_dir: Path,
        name: str,
        config: dict[str, Any],
        total_steps: int | None = None,
        wandb_id: str | None = None,
    ) -> Monitor:
        """The run's sinks; `wandb_id` continues that wandb run (a resumed run)."""
        sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl"), ConsoleSink(total_steps, cfg.log_every)]
        if cfg.wandb != "disabled":
            sinks.append(WandbSink(cfg, run_dir, name, config, wandb_id))
        return cls(sinks)

    @property
    def wandb_id(self) -> str | None:
        return next((s.run.id for s in self.sinks if isinstance(s, WandbSink)), None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
