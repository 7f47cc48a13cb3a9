"""A `verifiers` environment as a tidal env (issue 31): `envs: [{verifiers: ID, kwargs: {...}}]`.

`verifiers` is the environment library prime-rl and its environment hub use: an environment bundles
its dataset, its rollout logic (single turn, tools, multi-turn) against an OpenAI-compatible client,
and a rubric. tidal runs it as an agent: the environment's rollouts call the policy through the
rollout worker's endpoint, so every model call is recorded token for token like any agent's, and the
rubric's reward is the episode's reward (its functions' scores are logged as sub-scores).

ID is an installed environment package (as `vf-install` and the hub install them) or a file
(`./my_env.py`), whose `load_environment(**kwargs)` builds the environment. Its prompts are its own
dataset (`get_dataset()`; held-out: `get_eval_dataset()` when it sets one).

The environment runs in a process of its own (`verifiers_runner.py`), one per rollout worker,
started before the worker's first episode and restarted if it dies: verifiers 0.3 pins `mcp<2` and
`websockets<17`, which clash with vLLM's, so it lives in a directory of its own on that process's
PYTHONPATH (`$TIDAL_VERIFIERS_PATH`, default `.venv/verifiers`, what `scripts/setup.sh --verifiers`
installs), or in the interpreter's own packages.

Each rollout is scored on its own (`Environment.run_rollout`); rubrics that score a group together
are not supported. A rollout verifiers ends with an error (the model call failed, the context ran
out) counts as a failed episode.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tidal.config import ConfigError
from tidal.rewards.base import RewardResult

RUNNER = Path(__file__).with_name("verifiers_runner.py")
START_TIMEOUT_S = 300.0
"""How long the runner may take to import verifiers and build the environment."""


def runner_env() -> dict[str, str]:
    """The runner's environment: the verifiers directory first on its PYTHONPATH."""
    path = os.environ.get("TIDAL_VERIFIERS_PATH") or str(Path(sys.prefix) / "verifiers")
    parts = [p for p in (path if Path(path).is_dir() else "", os.environ.get("PYTHONPATH", "")) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}


def runner_command(mode: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, "-c", RUNNER.read_text(), mode, json.dumps(spec)]


def _error_line(stdout: str, stderr: str) -> str:
    """The runner's one-line error, else the last line of its stderr."""
    for line in reversed(stdout.splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "error" in obj:
            return str(obj["error"])
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else "it exited without a word"


class RunnerFailed(RuntimeError):
    """The verifiers runner died, or answered a rollout with an error."""


class VerifiersAgent:
    """An agent whose `run` is one rollout of a verifiers environment, in the runner process."""

    def __init__(self, env: str, env_args: dict[str, Any], where: str) -> None:
        try:
            json.dumps(env_args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: kwargs go to the environment's load_environment as JSON: {e}") from None
        self.spec = {"env": env, "env_args": env_args}
        self.where = where
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------ rows

    def splits(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The environment's (train, held-out) rows, read by a runner in `rows` mode."""
        proc = subprocess.run(
            runner_command("rows", self.spec),
            capture_output=True,
            text=True,
            env=runner_env(),
            timeout=START_TIMEOUT_S,
        )
        if proc.returncode != 0:
            raise ConfigError(f"{self.where}: cannot load the environment: {_error_line(proc.stdout, proc.stderr)}")
        rows = json.loads(proc.stdout.splitlines()[-1])
        if not rows["train"]:
            raise ConfigError(f"{self.where}: the environment's dataset is empty")
        return rows["train"], rows["eval"]

    # --------------------------------------------------------------------------------- runner

    async def start(self) -> None:
        """Start the runner unless it runs; returns once it has loaded the environment."""
        if self._proc is not None and self._proc.returncode is None:
            return
        proc = await asyncio.create_subprocess_exec(
            *runner_command("serve", self.spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=runner_env(),
            limit=1 << 24,
        )
        assert proc.stdout is not None
        try:
            first = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            raise RunnerFailed(f"the verifiers runner did not load the environment in {START_TIMEOUT_S:g}s") from None
        reply = json.loads(first) if first.strip() else {"error": f"it exited (rc {await proc.wait()})"}
        if not reply.get("ready"):
            raise RunnerFailed(f"the verifiers runner failed to start: {reply.get('error')}")
        self._proc = proc
        asyncio.ensure_future(self._read(proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            reply = json.loads(line)
            future = self._pending.pop(reply.get("id"), None)
            if future is not None and not future.done():
                future.set_result(reply)
        rc = await proc.wait()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RunnerFailed(f"the verifiers runner exited (rc {rc})"))
        self._pending.clear()

    async def run(self, client: Any, row: dict[str, Any]) -> RewardResult:
        await self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        request = {
            "id": request_id,
            "split": row.get("split", "train"),
            "example_id": row["example_id"],
            "base_url": str(client.base_url),
            "api_key": client.api_key,
            "model": "policy",
        }
        proc.stdin.write((json.dumps(request) + "\n").encode())
        await proc.stdin.drain()
        try:
            reply = await future
        finally:
            self._pending.pop(request_id, None)
        if reply.get("error") is not None:
            raise RunnerFailed(f"verifiers: {reply['error']}")
        if reply.get("reward") is None:
            raise RunnerFailed("verifiers: the rubric gave no reward")
        return RewardResult(float(reply["reward"]), dict(reply.get("metrics") or {}))
