"""An OpenAI-compatible endpoint over a rollout engine, for agents (issue 31).

`Endpoint` serves `/s/{session}/v1/chat/completions` (with `tools`; `stream: true` sends the answer as
one event when it is complete), `/s/{session}/v1/completions` and `/v1/models`, with FastAPI under
uvicorn in a thread of the process that holds the engine. The session in the URL names the episode:
each session's requests go through its `tidal.rollout.sessions.Session`, so the model continues
exactly the tokens it saw and generated, and the session's chains are the episode's samples. The
model's tool calls are parsed back into `tool_calls` (`tidal.rollout.tools`). A request needs the
run's key (`Authorization: Bearer KEY`).

Requests join the engine's running batch (`Batcher`: the thread that runs `Batcher.serve` drives
`Engine.generate`, whose `admit` hook adds the requests that arrived since at every chunk of tokens:
continuous batching, on either engine). The sampling is the run's: a request may lower its own
`max_tokens` (or `max_completion_tokens`), never raise it past `max_new_tokens` or the context past
`max_context_tokens`; its temperature and other sampling fields are ignored, so that the behavior
log-probs are those of the policy trained, and `n` must be 1 (each call is one turn of the episode).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tidal.rollout.engines.base import Engine
from tidal.rollout.sessions import Prompt, Renderer, Session
from tidal.rollout.tools import HermesParser, ToolParser, parse_answer
from tidal.types import Completion, SamplingParams


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    result: concurrent.futures.Future[Completion] = field(default_factory=concurrent.futures.Future)


@dataclass
class Serving:
    """How the engine generates while `Batcher.serve` runs: the run's sampling, and the worker's
    hooks (`between_generations` before each generate call: newer weights go in there; `on_chunk`
    inside one, with `rollout.interruptible`). `params.stop` holds `rollout.stop` and the env's."""

    params: SamplingParams
    batch_size: int = 64
    """Rows one generate call holds at most (`rollout.batch_size`); more requests wait for the next."""
    chunk_tokens: int = 8
    between_generations: Callable[[], None] | None = None
    on_chunk: Callable[[], None] | None = None


class Batcher:
    """Generates for requests made from any thread (the endpoint's) on the one thread that runs
    `serve`: a request that arrives while a batch is generating joins it at the next chunk of tokens
    (`Engine.generate`'s `admit`), up to `batch_size` rows. In a rollout worker the generation thread
    serves while its agents run (`tidal.rollout.agents`), so the engine is only ever driven by that
    thread; `start` serves on a thread of its own instead (a standalone endpoint, tests)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls = 0
        """`Engine.generate` calls so far (each may serve many requests; call i is seeded with i)."""
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, prompt_ids: list[int], max_tokens: int) -> concurrent.futures.Future[Completion]:
        request = _Request(prompt_ids, max_tokens)
        self._queue.put(request)
        return request.result

    def serve(self, how: Serving, until: Callable[[], bool], poll_s: float = 0.01) -> None:
        """Generate for the requests that arrive, on this thread, until `until()` (checked between
        generate calls, at least every `poll_s`) or `close`."""
        while not until():
            try:
                first = self._queue.get(timeout=poll_s)
            except queue.Empty:
                continue
            if first is None:
                return
            if how.between_generations is not None:
                how.between_generations()
            self._generate(first, how)
            self.calls += 1

    def start(self, how: Serving) -> Batcher:
        """Serve on a thread of its own until `close`."""
        self._thread = threading.Thread(target=self.serve, args=(how, lambda: False), name="tidal-batcher", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """End `serve` (after its generate call); requests still queued fail."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
        self.fail_queued(RuntimeError("the agent endpoint's engine stopped serving"))

    def fail_queued(self, error: Exception) -> None:
        """Fail every request that is queued and not taken (its agent was ended)."""
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None and not request.result.done():
                request.result.set_exception(error)

    def _generate(self, first: _Request, how: Serving) -> None:
        """One `generate` call: `first`, and every request that arrives before it ends while rows are free."""
        taken = [first]

        def admit(running: int) -> list[tuple[list[int], int]]:
            new = []
            while running + len(new) < how.batch_size:
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
                how.params.seeded(self.calls),
                on_chunk=how.on_chunk,
                chunk_tokens=how.chunk_tokens,
                max_tokens=[first.max_tokens],
                on_finish=finish,
                admit=admit,
            )
        except Exception as e:  # every request of the batch fails with it; serving goes on
            for r in taken:
                if not r.result.done():
                    r.result.set_exception(e)


class Endpoint:
    """The OpenAI-compatible server of one engine (see the module docstring); `start()` binds it.

    With `open_sessions` any session name in a URL starts a session (a standalone endpoint); else
    only those `open`ed are served, and a request for another (an episode that ended: its agent was
    cut off) gets a 404, so nothing is generated for, or recorded on, an episode already done."""

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
        parser: ToolParser | None = None,
        open_sessions: bool = True,
    ) -> None:
        self.batcher, self.tokenizer, self.model_name, self.key = batcher, tokenizer, model_name, key
        self.max_new_tokens, self.max_context_tokens = max_new_tokens, max_context_tokens
        self.renderer = Renderer(tokenizer)
        self.parser = parser or HermesParser()
        self.open_sessions = open_sessions
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

    def open(self, session: str) -> Session:
        """Start serving episode `session`."""
        self.sessions[session] = Session(self.renderer)
        return self.sessions[session]

    def close(self, session: str) -> Session | None:
        """Stop serving episode `session`; its session, with every model call it made."""
        return self.sessions.pop(session, None)

    def start(self) -> Endpoint:
        """Serve in a thread; port 0 binds a free port (the one the OS gives, read back once bound)."""
        import uvicorn

        # Idle connections are closed by the client (httpx: after 5 s) before the server would: a
        # server that closes one as a request is sent on it fails that request ("connection error").
        config = uvicorn.Config(
            self.app(), host=self.host, port=self.port, log_level="warning", lifespan="off", timeout_keep_alive=3600
        )
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

        app.add_middleware(_Authorize, key=self.key)

        @app.get("/v1/models")
        @app.get("/s/{session}/v1/models")
        async def models(session: str | None = None) -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "tidal"}]}

        @app.post("/s/{session}/v1/chat/completions")
        async def chat(session: str, request: Request) -> Any:
            return await self._answer(session, request, chat=True)

        @app.post("/s/{session}/v1/completions")
        async def completions(session: str, request: Request) -> Any:
            return await self._answer(session, request, chat=False)

        return app

    async def _answer(self, name: str, request: Request, chat: bool) -> Any:
        """One model call of episode `name`: a chat or a text completion, as the request asks."""
        session = self.sessions.get(name)
        if session is None:
            if not self.open_sessions:
                return _error(404, f"episode {name!r} is not running (it ended, or never started)", "not_running")
            session = self.open(name)
        try:
            body = await request.json()
            prompt, messages, text = self._prompt(session, body, chat)
        except (ValueError, KeyError, TypeError) as e:
            session.refused += 1
            return _error(400, f"malformed request: {e}")
        room = self.max_context_tokens - len(prompt.ids)
        if room < 1:
            session.refused += 1
            message = (
                f"the conversation is {len(prompt.ids)} tokens; this run allows {self.max_context_tokens} "
                "(rollout.max_context_tokens)"
            )
            return _error(400, message, "context_length_exceeded")
        asked = body.get("max_completion_tokens") or body.get("max_tokens") or self.max_new_tokens
        limit = max(1, min(int(asked), self.max_new_tokens, room))
        session.in_flight += 1
        try:
            completion = await asyncio.wrap_future(self.batcher.submit(prompt.ids, limit))
        finally:
            session.in_flight -= 1
            session.last_active = time.monotonic()
        if self.sessions.get(name) is not session:  # the episode ended while the model answered
            return _error(404, f"episode {name!r} ended while the model answered", "not_running")
        answer_text = completion.text
        usage = {
            "prompt_tokens": len(prompt.ids),
            "completion_tokens": len(completion.token_ids),
            "total_tokens": len(prompt.ids) + len(completion.token_ids),
        }
        finish = completion.finish_reason
        if not chat:
            session.record(prompt, completion, text=text + answer_text)
            choice = {"index": 0, "text": answer_text, "finish_reason": finish, "logprobs": None}
            return self._reply(body, "text_completion", choice, usage)
        parsed = parse_answer(self.parser, answer_text, prompt.tools)
        session.tool_parse_errors += parsed.error is not None
        answer = parsed.message()
        session.record(prompt, completion, messages, answer)
        choice = {"index": 0, "message": answer, "finish_reason": "tool_calls" if parsed.tool_calls else finish}
        return self._reply(body, "chat.completion", choice, usage)

    def _prompt(self, session: Session, body: Any, chat: bool) -> tuple[Prompt, list[dict], str]:
        """The request's prompt, and its messages (chat) or text (completions); raises on a malformed one."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        if int(body.get("n") or 1) != 1:
            raise ValueError("n must be 1: each call of an episode is one turn of its trajectory")
        if not chat:
            text = body["prompt"]
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if not isinstance(text, str) or not text:
                raise ValueError("prompt must be a non-empty string")
            return session.text_prompt(text), [], text
        messages, tools = body["messages"], body.get("tools")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        if body.get("tool_choice") not in (None, "auto", "none") or not (tools is None or isinstance(tools, list)):
            raise ValueError("tools must be a list, and tool_choice auto or none (forced calls are not supported)")
        if body.get("tool_choice") == "none":
            tools = None
        return session.prompt(messages, tools), messages, ""

    def _reply(self, body: dict, kind: str, choice: dict[str, Any], usage: dict[str, int]) -> Any:
        """The response body; with `stream: true` as server-sent events, the whole answer in one
        chunk (the answer is sent when it is complete)."""
        reply = {
            "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": usage,
        }
        if not body.get("stream"):
            return JSONResponse(reply)  # as it is: no pass through FastAPI's encoder
        if kind == "chat.completion":
            delta = {k: v for k, v in choice["message"].items() if v is not None}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
            streamed = {"index": 0, "delta": delta, "finish_reason": choice["finish_reason"]}
            chunk = {**reply, "object": "chat.completion.chunk", "choices": [streamed]}
        else:
            chunk = reply

        async def events() -> Any:
            yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


class _Authorize:
    """Refuses a request without the run's key (`Authorization: Bearer KEY`) with a 401: plain ASGI,
    as FastAPI's `@app.middleware` wraps every request in a task of its own."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.expected:
            await _error(401, "this tidal run's endpoint needs its key", "invalid_api_key")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    """The OpenAI API's error body: the `openai` client raises its matching exception."""
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)
