"""Ray runtime plumbing of `tidal train`: starting or joining Ray, plugin paths, actor errors."""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from tidal.config import EnvSpec, RewardSpec, RunConfig

T = TypeVar("T", RewardSpec, EnvSpec)

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that cannot go on (an actor died, a wait timed out); the CLI prints it as one line."""


class Stalled(RunError):
    """A wait that saw no progress within `ray.stall_timeout_s`: the run dumps every actor's stack."""


def absolute_plugin_paths(cfg: RunConfig) -> RunConfig:
    """Plugin file paths (rewards, envs, agents, verifiers environments, envs' rewards) and the
    distillation teacher's path made absolute: actors may not share the driver's working directory."""

    def fix(spec: T) -> T:
        update = {}
        for field in ("path", "agent", "verifiers"):
            value = getattr(spec, field, None)
            if value is not None and ".py:" in value:
                file, _, attr = value.rpartition(":")
                update[field] = f"{Path(file).resolve()}:{attr}"
            elif value is not None and value.endswith(".py"):  # a verifiers environment's file
                update[field] = str(Path(value).resolve())
        return spec.model_copy(update=update) if update else spec

    rewards = cfg.rewards.model_copy(update={"functions": [fix(s) for s in cfg.rewards.functions]})
    envs = [fix(e).model_copy(update={"rewards": [fix(r) for r in e.rewards]}) for e in cfg.envs]
    algorithm, distill = cfg.algorithm, cfg.algorithm.distill
    if distill is not None:
        teacher = distill.model_copy(update={"teacher": str(Path(distill.teacher).resolve())})
        algorithm = algorithm.model_copy(update={"distill": teacher})
    return cfg.model_copy(update={"rewards": rewards, "envs": envs, "algorithm": algorithm})


ACTOR_LOG_ENV = "TIDAL_ACTOR_LOG"
"""Names the run's log file to the actors' processes (see `actor_output_to_log`)."""
STACKS_ENV = "TIDAL_STACKS_DIR"
"""Names the directory (on each node) where the actors' processes dump their stacks on SIGUSR1."""


def terminal_log() -> logging.Handler:
    """The driver's log records on the terminal: tidal's from INFO, other libraries' from WARNING. A
    library's notices (matplotlib building its font cache on a machine's first run) are not the
    user's business; the run's log file (`run_log`) keeps them, as it keeps the actors'."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(lambda r: r.name.startswith("tidal") or r.levelno >= logging.WARNING)
    return handler


def run_log(run_dir: Path) -> logging.Handler:
    """The driver's log records also into `<run_dir>/run.log`, the file the actors write to; the
    caller removes the handler when the run ends."""
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return handler


def actor_output_to_log() -> None:
    """Ray's `worker_process_setup_hook`: the actor process's stdout and stderr go to the run's log
    file, so start-up noise (DeepSpeed banners, op builds, library warnings) stays out of the
    user's terminal. tidal's own warnings and every library's errors still reach Ray's stream to
    the driver (and the file), and an actor's exception still comes back as the call's error. Where
    the file cannot be opened (a node without the run directory), output stays on Ray's stream."""
    _stacks_on_signal()
    path = os.environ.get(ACTOR_LOG_ENV)
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    to_driver = os.fdopen(os.dup(2), "w", buffering=1)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    to_file = logging.StreamHandler(sys.stderr)
    to_file.setFormatter(logging.Formatter("%(asctime)s pid %(process)d %(name)s: %(message)s", datefmt="%H:%M:%S"))
    shown = logging.StreamHandler(to_driver)
    shown.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    shown.addFilter(lambda r: r.levelno >= (logging.WARNING if r.name.startswith("tidal") else logging.ERROR))
    root.addHandler(to_file)
    root.addHandler(shown)


def _stacks_on_signal() -> None:
    """SIGUSR1 makes this process write every thread's stack to `<TIDAL_STACKS_DIR>/<pid>.txt`:
    faulthandler's handler runs in C, so it answers even where Python is stuck (a collective, a
    kernel, a lock)."""
    where = os.environ.get(STACKS_ENV)
    if not where:
        return
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
        out = open(Path(where) / f"{os.getpid()}.txt", "w")  # noqa: SIM115 (kept open for the handler)
    except OSError:
        return
    faulthandler.register(signal.SIGUSR1, file=out, all_threads=True)


def dump_stacks(out: Path, wait_s: float = 2.0) -> Path | None:
    """Every live actor's stack (each thread's) of this job (not of others on a shared cluster), from
    every node, into `out`; None where the actors cannot be listed (Ray's own table of actors: class,
    pid, node, job)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    where = os.environ.get(STACKS_ENV)
    try:
        actors = ray._private.state.actors().values()
    except Exception as e:  # a private table: a Ray that changed it must not hide the stall itself
        log.warning("could not list the actors to dump their stacks: %s", e)
        return None
    job = ray.get_runtime_context().get_job_id()
    by_node: dict[str, list[tuple[str, int]]] = {}
    for a in actors:
        if a.get("State") == "ALIVE" and a.get("Pid") and a.get("JobID") == job:
            by_node.setdefault(a["Address"]["NodeID"], []).append((a["ActorClassName"], int(a["Pid"])))
    collect = ray.remote(_collect_stacks)
    refs = [
        collect.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            procs, where, wait_s
        )
        for node, procs in by_node.items()
    ]
    try:
        texts = ray.get(refs, timeout=wait_s + 30.0)
    except Exception as e:
        log.warning("could not collect the actors' stacks: %s", e)
        return None
    out.write_text("\n".join(texts))
    return out


def _collect_stacks(procs: list[tuple[str, int]], where: str | None, wait_s: float) -> str:
    """On one node: signal each actor process to dump its stacks, then read them."""
    import time

    for _, pid in procs:
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass
    time.sleep(wait_s)
    parts = []
    for name, pid in procs:
        try:
            text = (Path(where) / f"{pid}.txt").read_text() if where else ""
        except OSError:
            text = ""
        parts.append(f"=== {name} (pid {pid}) ===\n{text or '(no stack written)'}\n")
    return "\n".join(parts)


def start_ray(cfg: RunConfig, log_file: Path | None = None) -> None:
    """Join `ray.address`, or start a local runtime with enough logical CPUs for the actors.

    The working directory goes on the actors' PYTHONPATH, so `my_pkg.rewards:fn` imports in an
    actor exactly as it does in the driver. With `log_file`, the actors' output goes there.
    """
    import ray

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    pythonpath = os.pathsep.join(p for p in (cwd, os.environ.get("PYTHONPATH")) if p)
    # Actors load models quietly: no weight-loading bars between the driver's progress lines.
    env = {
        "PYTHONPATH": pythonpath,
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    runtime_env: dict[str, Any] = {"env_vars": env}
    if log_file is not None:
        env[ACTOR_LOG_ENV] = str(Path(log_file).resolve())
        env[STACKS_ENV] = os.environ[STACKS_ENV] = tempfile.mkdtemp(prefix="tidal-stacks-")
        runtime_env["worker_process_setup_hook"] = f"{__name__}.actor_output_to_log"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    need = cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker + cfg.trainer.num_ranks * cfg.trainer.num_cpus
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
    # The runtime tidal starts is its own: Ray's notice that it turned token auth on (the safe
    # default) is not news to the user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env=runtime_env,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def wait_for(refs: Any, what: str, timeout_s: float) -> Any:
    """`ray.get` bounded by `timeout_s`; a wait past it stops the run with a line naming the call."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise Stalled(
            f"{what} did not answer within ray.stall_timeout_s={timeout_s:g}s; raise it for slow models"
        ) from None


def actor_error_line(err: Exception, logs: str = "/tmp/ray/session_latest/logs") -> str:
    """One line for a failed or dead actor, naming the actor, the cause and where its output is."""
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
        return f"{name.group(1) if name else 'an'} actor died: {first} (its output is in {logs})"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
