"""An OpenAI-compatible endpoint over a rollout engine, for agents (issue 31, step 2).

`Endpoint` serves `/s/{session}/v1/chat/completions` and `/s/{session}/v1/models` (and `/v1/models`)
with FastAPI under uvicorn, in a thread of the process that holds the engine. The session in the
URL names the episode: each session's requests go through its `tidal.rollout.sessions.Session`, so
the model continues exactly the tokens it saw and generated, and the session's chains are the
episode's samples. A request needs the run's key (`Authorization: Bearer KEY`).

Requests join the engine's running batch (`Batcher`: one thread runs `Engine.generate`, and its
`admit` hook adds the requests that arrived since, at every chunk of tokens: continuous batching).
The sampling is the run's: a request may lower its own `max_tokens` (or `max_completion_tokens`),
never raise it past `max_new_tokens` or the context past `max_context_tokens`; its temperature and
other sampling fields are ignored, so that the behavior log-probs are those of the policy trained.

Not yet: tool calls parsed into `tool_calls`, `/v1/completions`, streaming, and the `agent` env kind
that hands an agent its session's client (the next steps of issue 31).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tidal.rollout.engines.base import Engine
from tidal.rollout.sessions import Renderer, Session
from tidal.types import Completion, SamplingParams


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    result: concurrent.futures.Future[Completion] = field(default_factory=concurrent.futures.Future)


class Batcher:
    """Generates for requests from any thread on one engine thread: a request that arrives while a
    batch is generating joins it at the next chunk of tokens (`Engine.generate`'s `admit`)."""

    def __init__(self, engine: Engine, params: SamplingParams, chunk_tokens: int = 8) -> None:
        self.engine, self.params, self.chunk_tokens = engine, params, chunk_tokens
        self.calls = 0
        """`Engine.generate` calls so far (each may serve many requests)."""
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tidal-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], max_tokens: int) -> concurrent.futures.Future[Completion]:
        request = _Request(prompt_ids, max_tokens)
        self._queue.put(request)
        return request.result

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            self._serve(first)
            self.calls += 1

    def _serve(self, first: _Request) -> None:
        """One `generate` call: `first`, and every request that arrives before it ends."""
        taken = [first]

        def admit(_running: int) -> list[tuple[list[int], int]]:
            new = []
            while True:
                try:
                    request = self._queue.get_nowait()
                except queue.Empty:
                    break
                if request is None:  # closing: finish this batch first
                    self._queue.put(None)
                    break
                new.append(request)
            taken.extend(new)
            return [(r.prompt_ids, r.max_tokens) for r in new]

        def finish(i: int, completion: Completion) -> None:
            taken[i].result.set_result(completion)

        try:
            self.engine.generate(
                [first.prompt_ids],
                self.params.seeded(self.calls),
                chunk_tokens=self.chunk_tokens,
                max_tokens=[first.max_tokens],
                on_finish=finish,
                admit=admit,
            )
        except Exception as e:  # every request of the batch fails with it; the thread goes on
            for r in taken:
                if not r.result.done():
                    r.result.set_exception(e)


class Endpoint:
    """The OpenAI-compatible server of one engine (see the module docstring); `start()` binds it."""

    def __init__(
        self,
        batcher: Batcher,
        tokenizer: Any,
        model_name: str,
        key: str,
        max_new_tokens: int,
        max_context_tokens: int,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.batcher, self.tokenizer, self.model_name, self.key = batcher, tokenizer, model_name, key
        self.max_new_tokens, self.max_context_tokens = max_new_tokens, max_context_tokens
        self.renderer = Renderer(tokenizer)
        self.sessions: dict[str, Session] = {}
        self.host, self.port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def session_url(self, session: str) -> str:
        """The `base_url` an OpenAI client of episode `session` is given."""
        return f"{self.base_url}/s/{session}/v1"

    def start(self) -> Endpoint:
        """Serve in a thread; port 0 binds a free port (the one the OS gives, read back once bound)."""
        import uvicorn

        config = uvicorn.Config(self.app(), host=self.host, port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="tidal-endpoint", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the agent endpoint did not start on {self.base_url}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join()

    # -- the API

    def app(self) -> FastAPI:
        app = FastAPI()

        def error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
            # The OpenAI API's error body: the `openai` client raises its matching exception.
            return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)

        @app.middleware("http")
        async def authorize(request: Request, call_next: Any) -> Any:
            if request.headers.get("authorization") != f"Bearer {self.key}":
                return error(401, "this tidal run's endpoint needs its key", "invalid_request_error", "invalid_api_key")
            return await call_next(request)

        @app.get("/v1/models")
        @app.get("/s/{session}/v1/models")
        async def models(session: str | None = None) -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "tidal"}]}

        @app.post("/s/{session}/v1/chat/completions")
        async def chat(session: str, request: Request) -> Any:
            try:
                body = await request.json()
                messages, tools = body["messages"], body.get("tools")
                if not isinstance(messages, list) or not messages:
                    raise ValueError("messages must be a non-empty list")
            except (ValueError, KeyError, TypeError) as e:
                return error(400, f"malformed request: {e}", "invalid_request_error")
            state = self.sessions.setdefault(session, Session(self.renderer))
            prompt = state.prompt(messages, tools)
            room = self.max_context_tokens - len(prompt.ids)
            if room < 1:
                message = (
                    f"the conversation is {len(prompt.ids)} tokens; this run allows {self.max_context_tokens} "
                    "(rollout.max_context_tokens)"
                )
                return error(400, message, "invalid_request_error", "context_length_exceeded")
            asked = body.get("max_completion_tokens") or body.get("max_tokens") or self.max_new_tokens
            limit = max(1, min(int(asked), self.max_new_tokens, room))
            completion = await asyncio.wrap_future(self.batcher.submit(prompt.ids, limit))
            text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            answer = {"role": "assistant", "content": text}
            state.record(prompt, messages, completion, answer)
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": answer, "finish_reason": completion.finish_reason}],
                "usage": {
                    "prompt_tokens": len(prompt.ids),
                    "completion_tokens": len(completion.token_ids),
                    "total_tokens": len(prompt.ids) + len(completion.token_ids),
                },
            }

        return app
