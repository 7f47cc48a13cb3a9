"""Ray runtime plumbing of `tidal train`: starting or joining Ray, plugin paths, actor errors."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, TypeVar

from tidal.config import EnvSpec, RewardSpec, RunConfig

T = TypeVar("T", RewardSpec, EnvSpec)

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that cannot go on (an actor died, a wait timed out); the CLI prints it as one line."""


def absolute_plugin_paths(cfg: RunConfig) -> RunConfig:
    """Plugin file paths (rewards, envs, envs' rewards) made absolute: actors may not share the
    driver's working directory."""

    def fix(spec: T) -> T:
        if spec.path is not None and ".py:" in spec.path:
            file, _, attr = spec.path.rpartition(":")
            return spec.model_copy(update={"path": f"{Path(file).resolve()}:{attr}"})
        return spec

    rewards = cfg.rewards.model_copy(update={"functions": [fix(s) for s in cfg.rewards.functions]})
    envs = [fix(e).model_copy(update={"rewards": [fix(r) for r in e.rewards]}) for e in cfg.envs]
    return cfg.model_copy(update={"rewards": rewards, "envs": envs})


def start_ray(cfg: RunConfig) -> None:
    """Join `ray.address`, or start a local runtime with enough logical CPUs for the actors.

    The working directory goes on the actors' PYTHONPATH, so `my_pkg.rewards:fn` imports in an
    actor exactly as it does in the driver.
    """
    import ray

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    pythonpath = os.pathsep.join(p for p in (cwd, os.environ.get("PYTHONPATH")) if p)
    # Actors load models quietly: no weight-loading bars between the driver's progress lines.
    env = {"PYTHONPATH": pythonpath, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    if cfg.ray.address is not None:
        ray.init(address=cfg.ray.address, runtime_env={"env_vars": env}, log_to_driver=True)
        return
    need = cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker + cfg.trainer.num_cpus
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
             logging_level=logging.WARNING, log_to_driver=True)  # fmt: skip


def wait_for(refs: Any, what: str, timeout_s: float) -> Any:
    """`ray.get` bounded by `timeout_s`; a wait past it stops the run with a line naming the call."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RunError(f"{what} did not answer within ray.timeout_s={timeout_s:g}s; raise it for slow "
                       "models, or look for a hung actor in /tmp/ray/session_latest/logs") from None  # fmt: skip


def actor_error_line(err: Exception) -> str:
    """One line for a failed or dead actor, naming the actor and the cause."""
    import ray

    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if err.cause is not None else err
        # The error Ray raises is also an instance of the cause's class and forwards unknown
        # attributes to the cause, so `function_name` may be missing.
        where = getattr(err, "function_name", None) or "an actor call"
        return f"{where} failed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    if isinstance(err, ray.exceptions.ActorDiedError | ray.exceptions.RayActorError):
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        name = re.search(r"class_name: (\w+)", text)
        return f"{name.group(1) if name else 'an'} actor died: {first} (its log is in /tmp/ray/session_latest/logs)"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
