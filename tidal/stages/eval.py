"""`tidal eval CONFIG [checkpoint=PATH]`: score a checkpoint on the config's held-out data and envs.

The same evaluation as in a run (`tidal.rollout.evaluate`): greedy answers to every held-out row
(at most `eval.num_samples` per env), scored by each env, or by `rewards.functions` without envs,
exactly as in training. It runs in this process, with the config's rollout engine; the policy is the
checkpoint given, else the config's own (`model.path`, a preset, or the SFT warm start).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tidal.config import ConfigError, RunConfig
from tidal.model.loading import load_tokenizer
from tidal.rollout.env_runtime import attach_agents, build_runtimes
from tidal.rollout.evaluate import evaluate, own_forward
from tidal.rollout.worker import build_engine
from tidal.stages.check import load_env_splits
from tidal.stages.warm_start import resolve_policy_dir
from tidal.telemetry.metrics import values


def run_eval(cfg: RunConfig, checkpoint: str | None = None) -> dict[str, float]:
    """Held-out metrics of `checkpoint` (a save_pretrained directory; default: the config's policy),
    printed as a table and returned."""
    if checkpoint is not None and not (Path(checkpoint) / "config.json").is_file():
        raise ConfigError(
            f"checkpoint {checkpoint!r} is not a model directory (no config.json); name a run's "
            "checkpoint/ folder or any save_pretrained directory"
        )
    model_dir = Path(checkpoint) if checkpoint is not None else resolve_policy_dir(cfg.model)[0]
    _, prompts, _ = load_env_splits(cfg, load_tokenizer(model_dir), check_train=False)
    if not prompts:
        raise ConfigError("the config has no held-out data: set data.source.eval_files (or an env's data)")
    # As many threads as a rollout worker: the same kernels, so the same greedy answers as in the run.
    torch.set_num_threads(max(1, math.ceil(cfg.rollout.num_cpus_per_worker)))
    engine = build_engine(cfg.model, cfg.rollout, str(model_dir))
    runtimes = build_runtimes(cfg.envs, cfg.rewards, cfg.data)
    agents = attach_agents(runtimes, engine, cfg.rollout, model_dir.name)
    try:
        metrics, _ = evaluate(engine, runtimes, prompts, cfg.eval, cfg.rollout, own_forward(engine))
    finally:
        for rt in runtimes.values():
            rt.scorer.close()
        if agents is not None:
            agents.close()
    out = values(metrics)
    table = Table(title=f"held-out evaluation of {model_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(out):
        table.add_row(key, f"{out[key]:.4g}")
    Console().print(table)
    return out
