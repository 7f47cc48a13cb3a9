"""Metrics sinks behind one small interface: wandb, a jsonl file in the run directory, the terminal.

Every row is logged against one monotonic step (the trainer's), so wandb never drops a row.
Keys are namespaced (`train/`, `eval/`, `rollout/`, ...).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from tidal.config import MonitorConfig

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


class StdoutSink:
    """One progress line per logged row, with the few keys a person watches."""

    KEYS = {
        "reward/mean": "reward", "rollout/accuracy": "acc", "eval/accuracy": "eval_acc", "train/loss": "loss",
        "train/grad_norm": "grad_norm", "train/entropy": "entropy", "offpolicy/is_weight_mean": "is_w",
        "rollout/response_length": "len", "train/lr": "lr", "rollout/logp_mismatch_mean": "mismatch",
        "perf/step_time_s": "step_s",
    }  # fmt: skip

    def __init__(self, total_steps: int | None = None) -> None:
        self.total = total_steps

    def log(self, metrics: dict[str, float], step: int) -> None:
        shown = [f"{label}={_fmt(metrics[k])}" for k, label in self.KEYS.items() if k in metrics]
        of = f"/{self.total}" if self.total else ""
        print(f"[step {step}{of}] " + "  ".join(shown), file=sys.stdout, flush=True)

    def close(self) -> None:
        pass


class WandbSink:
    def __init__(self, cfg: MonitorConfig, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        import wandb

        mode = cfg.wandb
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            log.warning("monitor.wandb=online but WANDB_API_KEY is not set; logging offline instead")
            mode = "offline"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, name=name, dir=str(run_dir), mode=mode, config=config,
                              settings=wandb.Settings(console="off", silent=True))  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def _fmt(x: float) -> str:
    if isinstance(x, float) and (math.isnan(x) or abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3)):
        return f"{x:.3g}"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


class Monitor:
    """Fans one metrics row out to every sink."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    @classmethod
    def for_run(cls, cfg: MonitorConfig, run_dir: Path, name: str, config: dict[str, Any],
                total_steps: int | None = None) -> Monitor:  # fmt: skip
        sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl"), StdoutSink(total_steps)]
        if cfg.wandb != "disabled":
            sinks.append(WandbSink(cfg, run_dir, name, config))
        return cls(sinks)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
