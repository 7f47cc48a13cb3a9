"""Agent episodes on a rollout worker: the user's agents call the policy through the worker's
OpenAI-compatible endpoint, and their sessions become samples (issue 31).

`AgentServer` is a worker's endpoint (`tidal.rollout.endpoint`), started once, and an event loop of
its own in a daemon thread where the agents run. `run_agents` runs one episode per (prompt, copy):
each agent gets a client bound to its episode's session, and meanwhile the calling thread (the
worker's generation thread) serves the engine (`Batcher.serve`): every request of every running
agent joins the batch being generated, and newer weights go in between generate calls (or inside
one, with `rollout.interruptible`), as for any env. It returns when every agent has returned, failed
or been cut off.

An agent is cut off when it has been idle (no model call of its own in flight) for
`rewards.timeout_s`: time spent waiting on the model never counts against it, so long generations on
a busy engine do not, and an agent that hangs, or spins in its own code, does. Its session is closed
at once, so a request it sends later gets a 404 and nothing more is recorded for it (a sync agent's
thread cannot be killed, and is left to end on its own).

Each session's chains become the episode's samples (`episode_samples`): token for token what the
model saw and generated, sharing the episode's reward and its index in the group (`Sample.episode`),
so advantages count it once. Failures are recorded on them (`Sample.reward_errors`, and so counted
in `env/<label>/failed_samples`) and per episode in `env/<label>/agent_*` metrics: an agent that
raised or was cut off, one that made no model call (one empty sample stands for the episode), the
requests refused, the tool calls the model wrote that could not be parsed, and the splits.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import httpx
import openai

from tidal.config import EndpointConfig
from tidal.envs.agent import AgentEnv
from tidal.plugins import describe_exception
from tidal.rollout.endpoint import Batcher, Endpoint, Serving
from tidal.rollout.engines.base import Engine
from tidal.rollout.episodes import Episode, episode_sample
from tidal.rollout.sessions import Session
from tidal.rollout.tools import tool_parser
from tidal.types import Prompt, Sample


@dataclass
class Outcome:
    """How one agent's episode ended."""

    reward: Any = None
    """What `run` returned (None when it did not return)."""
    error: str | None = None


class AgentServer:
    """A worker's endpoint over its engine, and the event loop its agents run on."""

    def __init__(
        self,
        engine: Engine,
        cfg: EndpointConfig,
        model_name: str,
        max_new_tokens: int,
        max_context_tokens: int,
        index: int = 0,
    ) -> None:
        self.engine = engine
        self.key = cfg.key or secrets.token_urlsafe(24)
        self.batcher = Batcher(engine)
        self.endpoint = Endpoint(
            self.batcher,
            engine.tokenizer,
            model_name,
            self.key,
            max_new_tokens,
            max_context_tokens,
            host=cfg.host,
            port=cfg.port + index if cfg.port else 0,
            parser=tool_parser(cfg.tool_parser, engine.tokenizer),
            open_sessions=False,
        ).start()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tidal-agents", daemon=True)
        self._thread.start()
        # One connection pool for every episode's client: a client of its own (an SSL context and a
        # pool each) costs tens of milliseconds, which 128 agents starting together would wait for.
        self._http = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None))
        self._http_sync = httpx.Client(timeout=None, limits=httpx.Limits(max_connections=None))

    def close(self) -> None:
        self.endpoint.stop()
        self.batcher.close()
        asyncio.run_coroutine_threadsafe(self._http.aclose(), self.loop).result(timeout=5.0)
        self._http_sync.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5.0)

    def run_agents(self, env: AgentEnv, prompts: list[Prompt], serving: Serving, idle_s: float) -> list[Sample]:
        """One episode of `env`'s agent per prompt (a prompt repeated for each episode of its group,
        consecutive), the engine served on this thread meanwhile; the episodes' samples, unscored."""
        try:
            asyncio.run_coroutine_threadsafe(env.start(), self.loop).result()
            failed_start = None
        except Exception as e:  # the agent's own start(): every episode of this batch fails with it
            failed_start = f"start() raised {describe_exception(e)}"
        names = [f"{p.group_id}-{uuid.uuid4().hex[:12]}" for p in prompts]
        sessions = [self.endpoint.open(n) for n in names]
        futures = [
            asyncio.run_coroutine_threadsafe(self._episode(env, n, s, p.row, idle_s, failed_start), self.loop)
            for n, s, p in zip(names, sessions, prompts, strict=True)
        ]
        try:
            self.batcher.serve(serving, until=lambda: all(f.done() for f in futures))
        finally:
            for n in names:
                self.endpoint.close(n)
            self.batcher.fail_queued(RuntimeError("the episode ended"))
        outcomes = [f.result() for f in futures]
        index = _episode_indices(prompts)
        return [
            s
            for p, session, outcome, i in zip(prompts, sessions, outcomes, index, strict=True)
            for s in episode_samples(session, outcome, p, i, env, self.engine)
        ]

    async def _episode(
        self, env: AgentEnv, name: str, session: Session, row: dict, idle_s: float, failed_start: str | None
    ) -> Outcome:
        """Run the agent of one episode to its end, or cut it off when idle past `idle_s`."""
        if failed_start is not None:
            return Outcome(error=failed_start)
        url, row = self.endpoint.session_url(name), dict(row)
        if env.is_async:
            client: Any = openai.AsyncOpenAI(base_url=url, api_key=self.key, max_retries=0, http_client=self._http)
            task = asyncio.ensure_future(env.run(client, row, **env.kwargs))
        else:
            client = openai.OpenAI(base_url=url, api_key=self.key, max_retries=0, http_client=self._http_sync)
            task = asyncio.ensure_future(asyncio.to_thread(env.run, client, row, **env.kwargs))
        session.last_active = time.monotonic()  # idle from when the agent starts, not from when it was queued
        while not task.done():
            await asyncio.wait({task}, timeout=min(idle_s, 0.5))
            if not task.done() and session.in_flight == 0 and time.monotonic() - session.last_active > idle_s:
                self.endpoint.close(name)  # a request it sends later is refused
                task.cancel()
                return Outcome(error=f"cut off: idle for {idle_s:g}s (rewards.timeout_s) between model calls")
        try:
            return Outcome(reward=task.result())
        except BaseException as e:  # the user's agent: contained, recorded on its samples
            return Outcome(error=f"raised {describe_exception(e)}")


def _episode_indices(prompts: list[Prompt]) -> list[int]:
    """Each prompt's episode index within its group (the copies of a group's prompt are 0, 1, ...)."""
    seen: dict[int, int] = {}
    out = []
    for p in prompts:
        out.append(seen.get(p.group_id, 0))
        seen[p.group_id] = out[-1] + 1
    return out


def episode_samples(
    session: Session, outcome: Outcome, prompt: Prompt, episode: int, env: AgentEnv, engine: Engine
) -> list[Sample]:
    """The samples of one agent episode: one per chain of its session, sharing its reward and
    `episode` index; one empty sample, carrying the error, for an episode with no model call."""
    errors = [] if outcome.error is None else [f"agent: {outcome.error}"]
    if not session.chains and outcome.error is None:
        errors.append("agent: made no model call")
    info = {
        "agent_failed": float(outcome.error is not None),
        "agent_model_calls": float(session.calls),
        "agent_refused": float(session.refused),
        "agent_tool_parse_errors": float(session.tool_parse_errors),
        "agent_splits": float(session.splits),
    }
    reward = outcome.reward if outcome.error is None and session.chains else None
    episodes: list[Episode] = list(session.chains)
    if not episodes:  # no model call: an empty episode of the row's prompt text stands for it
        tok = engine.tokenizer
        episodes = [Episode(tok.encode(env.prompt(prompt.row), add_special_tokens=False) or [tok.eos_token_id])]
    last = len(episodes) - 1
    return [
        replace(
            episode_sample(e, prompt, engine),
            reward_errors=list(errors),
            env_info=info,
            episode=episode,
            episode_end=k == last,
            agent_reward=reward,
        )
        for k, e in enumerate(episodes)
    ]
