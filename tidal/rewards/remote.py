"""A reward scored over HTTP: a reward-model server or an LLM judge (`remote_judge`).

Two request styles (`api`):

- `json`: `POST url` with `{"prompt", "completion", "answer", "row"}`; the server replies
  `{"score": float, "sub_scores": {name: float}}` (sub-scores optional, logged but not summed).
- `openai`: an OpenAI-compatible chat completions endpoint (vLLM, SGLang, a hosted API). The
  judge's reply is searched for `score_pattern` (the last match counts) and scaled by `score_scale`.

Each attempt is bounded by `timeout_s`; connection errors, timeouts, HTTP 429 and 5xx are retried
with exponential backoff and jitter (a 429 / 503 `Retry-After` is honoured, both capped by
`max_backoff_s`); any other 4xx raises at once. At most `max_concurrency` requests are in flight.
The scorer's `rewards.timeout_s` bounds a whole call (waiting for a slot, every attempt and every
backoff), so set it above `(retries + 1) * timeout_s` plus the queueing of one batch.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import re
import string
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import Field, ValidationError, field_validator, model_validator

from tidal.config import Strict
from tidal.plugins import describe_exception
from tidal.rewards.base import RewardResult
from tidal.types import Sample

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a careful, impartial grader. You judge correctness first, then clarity."
DEFAULT_PROMPT_TEMPLATE = (
    "Grade the response to the task below from 0 (wrong or useless) to 10 (correct and complete).\n\n"
    "Task:\n{prompt}\n\n"
    "Reference answer (may be empty):\n{answer}\n\n"
    "Response:\n{completion}\n\n"
    "Explain your grade in a few sentences, then end with a line of the form 'Score: <0-10>'."
)
# `\W*?` lets markdown through (`**Score:** 7`); being lazy it stops before a minus sign.
DEFAULT_SCORE_PATTERN = r"(?i)\bscore\b\W*?[:=]\W*?(-?\d+(?:\.\d+)?)"

_OPENAI_ONLY = frozenset({"model", "system", "prompt_template", "score_pattern", "score_scale", "max_tokens"})
_TEMPLATE_FIELDS = ("prompt", "completion", "answer")


class RemoteJudgeConfig(Strict):
    """The kwargs of `remote_judge` (`rewards.functions[i].kwargs`)."""

    url: str
    """Endpoint to POST to: the full `.../v1/chat/completions` URL for `api: openai`."""
    api: Literal["openai", "json"] = "json"
    """`json`: a reward-model server replying `{"score", "sub_scores"}`; `openai`: a chat-completions judge."""
    model: str | None = None
    """Model name sent to the judge (required with `api: openai`)."""
    system: str = DEFAULT_SYSTEM
    """System message of the judge (`openai` only)."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """User message of the judge, a `str.format` template of `{prompt}`, `{completion}`, `{answer}` (empty
    when the row has none) and any other column of the row; write literal braces as `{{` `}}` (`openai` only)."""
    score_pattern: str = DEFAULT_SCORE_PATTERN
    """Regex with exactly one group capturing the score in the judge's reply; the last match counts,
    since a judge's reasoning may quote scores before its verdict (`openai` only)."""
    score_scale: float = Field(1.0, allow_inf_nan=False)
    """Factor applied to the parsed score, e.g. 0.1 for the default 0-10 prompt (`openai` only)."""
    max_tokens: int = Field(512, ge=1)
    """Largest reply of the judge in tokens; leave room for its reasoning before the score (`openai` only)."""
    headers: dict[str, str] = {}
    """Extra HTTP headers. Never put secrets here (they are echoed in config errors): use `api_key_env`."""
    api_key_env: str | None = None
    """Name of an environment variable holding a bearer token, sent as `Authorization: Bearer <token>`."""
    timeout_s: float = Field(30.0, gt=0.0)
    """Time limit of one HTTP attempt (connecting, sending and reading the whole reply)."""
    retries: int = Field(2, ge=0, le=100)
    """Further attempts after a connection error, a timeout, HTTP 429 or 5xx (other 4xx are never retried)."""
    backoff_s: float = Field(0.5, ge=0.0)
    """Base delay before retry k: between half and all of `backoff_s * 2**(k-1)`, capped by `max_backoff_s`."""
    max_backoff_s: float = Field(10.0, ge=0.0)
    """Longest wait between attempts, also the cap on a server's `Retry-After`."""
    max_concurrency: int = Field(8, ge=1)
    """Most requests in flight at once across all calls of this reward (retries wait without holding a slot)."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"(?i)https?://[^/?#]+", url):
            raise ValueError(f"url must start with http:// or https:// and name a host, got {url!r}")
        return url

    @field_validator("score_pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groups
        except re.error as e:
            raise ValueError(f"score_pattern {pattern!r} is not a valid regex: {e}") from None
        if groups != 1:
            raise ValueError(f"score_pattern needs exactly one capturing group (the score), {pattern!r} has {groups}")
        return pattern

    @field_validator("prompt_template")
    @classmethod
    def _formattable(cls, template: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as e:
            raise ValueError(
                f"prompt_template is not a str.format template ({e}); write literal braces as {{{{ }}}}"
            ) from None
        if "completion" not in names:
            raise ValueError("prompt_template must contain {completion}, else the judge never sees the response")
        if any(not name or name[0].isdigit() for name in names):
            raise ValueError("prompt_template fields must be named, e.g. {prompt}; `{}` and `{0}` have nothing to fill")
        return template

    @model_validator(mode="after")
    def _fits_api(self) -> RemoteJudgeConfig:
        if self.api == "openai" and self.model is None:
            raise ValueError("api 'openai' needs kwargs.model (the model name the judge server serves)")
        misplaced = sorted(self.model_fields_set & _OPENAI_ONLY)
        if self.api == "json" and misplaced:
            raise ValueError(f"{', '.join(misplaced)} only apply to api 'openai' (this judge has api 'json')")
        return self


class RemoteJudgeError(RuntimeError):
    """A judge request that failed for good: the message is one line naming the URL, status and attempts."""


@dataclass
class _LoopState:
    client: httpx.AsyncClient
    slots: asyncio.Semaphore


class RemoteJudge:
    """Async reward scored by an HTTP reward model or LLM judge; kwargs are `RemoteJudgeConfig`'s fields.

    Built once at start-up (a missing `api_key_env` variable fails then) and called on the scorer's
    event loop. The HTTP client (keep-alive) and the concurrency limit are created lazily, one per
    event loop, since asyncio objects belong to the loop they were made on; `close()` / `aclose()`
    release the connections. The client honours the usual `HTTPS_PROXY` / `NO_PROXY` variables.
    """

    def __init__(self, **kwargs: Any) -> None:
        try:
            self.cfg = RemoteJudgeConfig(**kwargs)
        except ValidationError as e:
            raise ValueError(_one_line(e)) from None
        cfg = self.cfg
        self._pattern = re.compile(cfg.score_pattern)
        # The query string may carry a key (`?key=...`); error messages show the URL without it.
        self._where = f"POST {cfg.url.split('?', 1)[0]}"
        self._headers = {"Content-Type": "application/json", **cfg.headers}
        if cfg.api_key_env is not None:
            token = os.environ.get(cfg.api_key_env, "")
            if not token:
                raise ValueError(
                    f"api_key_env names the environment variable {cfg.api_key_env!r}, which is unset or empty; "
                    "export it with the judge's API key"
                )
            if any(k.lower() == "authorization" for k in cfg.headers):
                raise ValueError("set either headers.Authorization or api_key_env, not both")
            self._headers["Authorization"] = f"Bearer {token}"
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._lock = threading.Lock()  # Built in one thread, called on the scorer's loop, closed from a third.

    async def __call__(self, sample: Sample, row: dict[str, Any]) -> RewardResult | float:
        prompt, answer = row.get("prompt", ""), row.get("answer")
        if self.cfg.api == "json":
            body = {"prompt": prompt, "completion": sample.text, "answer": answer, "row": row}
            return self._score_from_json(await self._post(body))
        fields = {**row, "prompt": prompt, "completion": sample.text, "answer": "" if answer is None else answer}
        try:
            user = self.cfg.prompt_template.format_map(fields)
        except KeyError as e:
            raise ValueError(
                f"prompt_template names {{{e.args[0]}}}, which is neither one of {_TEMPLATE_FIELDS} "
                f"nor a column of the row (its columns: {sorted(row)})"
            ) from None
        body = {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": self.cfg.system}, {"role": "user", "content": user}],
            "temperature": 0,
            "max_tokens": self.cfg.max_tokens,
        }
        return self._score_from_chat(await self._post(body))

    async def aclose(self) -> None:
        """Close the HTTP client of the running event loop; a later call opens a new one."""
        with self._lock:
            state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.client.aclose()

    def close(self) -> None:
        """Close the HTTP clients of every event loop, each on its own loop; inside a loop, await `aclose()`."""
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        with self._lock:
            if current is not None and current in self._states:
                raise RuntimeError("RemoteJudge.close() would block its own event loop; use `await judge.aclose()`")
            states, self._states = self._states, {}
        for loop, state in states.items():
            if loop.is_closed():  # Its sockets went with it.
                continue
            if loop.is_running():  # e.g. the scorer's loop thread
                asyncio.run_coroutine_threadsafe(state.client.aclose(), loop).result(timeout=10.0)
            else:
                loop.run_until_complete(state.client.aclose())

    # --------------------------------------------------------------------------------------- HTTP

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._states.get(loop)
            if state is None:
                # Loops closed since (each asyncio.run makes one) can never be used again.
                for old in [lp for lp in self._states if lp.is_closed()]:
                    del self._states[old]
                # The semaphore queues calls before an attempt starts its clock; the pool's limit only
                # backs it up (a wait for a pooled connection would count against timeout_s).
                n = self.cfg.max_concurrency
                client = httpx.AsyncClient(
                    headers=self._headers,
                    timeout=httpx.Timeout(self.cfg.timeout_s),
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                )
                state = self._states[loop] = _LoopState(client, asyncio.Semaphore(n))
            return state

    async def _post(self, body: dict[str, Any]) -> Any:
        """The decoded JSON reply of a 2xx, after up to `retries` retries; raises `RemoteJudgeError` otherwise."""
        try:
            content = json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{self._where}: the request is not valid JSON ({e}); the row's values must be JSON types"
            ) from None
        state = self._state()
        attempts = self.cfg.retries + 1
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            async with state.slots:
                try:
                    # httpx's timeouts bound each phase (e.g. the gap between two chunks); this bounds the whole.
                    async with asyncio.timeout(self.cfg.timeout_s):
                        resp = await state.client.post(self.cfg.url, content=content)
                except (TimeoutError, httpx.TimeoutException):
                    why = f"timed out after {self.cfg.timeout_s}s"
                except httpx.TransportError as e:
                    why = describe_exception(e)
                else:
                    if resp.is_success:
                        return self._decode(resp)
                    if resp.status_code != 429 and resp.status_code < 500:
                        hint = ""
                        if resp.status_code == 404 and self.cfg.api == "openai":
                            hint = " (api 'openai' wants the full URL, e.g. http://host:8000/v1/chat/completions)"
                        raise RemoteJudgeError(
                            f"{self._where}: HTTP {resp.status_code} after {attempt} attempt(s), not retried{hint}: "
                            f"{_excerpt(resp.text)}"
                        )
                    why, retry_after = f"HTTP {resp.status_code}: {_excerpt(resp.text, 120)}", _retry_after(resp)
            if attempt == attempts:
                raise RemoteJudgeError(f"{self._where}: {why} (attempt {attempt} of {attempts}, giving up)")
            delay = self._delay(attempt, retry_after)
            logger.debug("%s: %s (attempt %d of %d); retrying in %.2fs", self._where, why, attempt, attempts, delay)
            await asyncio.sleep(delay)  # Outside the slot, so a backing-off call does not block the others.
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cap = self.cfg.max_backoff_s
        if retry_after is not None:
            return min(cap, retry_after)
        step = min(cap, self.cfg.backoff_s * 2.0 ** (attempt - 1))
        # "Equal jitter": callers that failed together spread out, yet never retry right away.
        return step / 2 + random.uniform(0.0, step / 2)

    def _decode(self, resp: httpx.Response) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise RemoteJudgeError(
                f"{self._where}: HTTP {resp.status_code} but the reply is not JSON: {_excerpt(resp.text)}"
            ) from None

    # --------------------------------------------------------------------------------------- replies

    def _score_from_json(self, data: Any) -> RewardResult:
        if not isinstance(data, dict) or "score" not in data:
            raise RemoteJudgeError(f"{self._where}: no 'score' in the reward model's reply: {_excerpt(data)}")
        score, subs = data["score"], data.get("sub_scores") or {}
        if not _is_number(score):
            raise RemoteJudgeError(f"{self._where}: the reply's 'score' is {_excerpt(score, 60)}, expected a number")
        if not isinstance(subs, dict) or not all(_is_number(v) for v in subs.values()):
            raise RemoteJudgeError(
                f"{self._where}: the reply's 'sub_scores' must map names to numbers, got {_excerpt(subs)}"
            )
        return RewardResult(float(score), {str(k): float(v) for k, v in subs.items()})

    def _score_from_chat(self, data: Any) -> float:
        try:
            choice: dict[str, Any] = data["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            choice, content = {}, None
        if not isinstance(content, str):
            raise RemoteJudgeError(
                f"{self._where}: not a chat completion with text in choices[0].message.content: {_excerpt(data)}"
            )
        found = self._pattern.findall(content)
        if not found:
            cut = " (cut off at max_tokens: raise it)" if choice.get("finish_reason") == "length" else ""
            raise RemoteJudgeError(f"{self._where}: no score found in the judge's reply{cut}: {_excerpt(content)}")
        try:
            score = float(found[-1])
        except ValueError:
            raise RemoteJudgeError(
                f"{self._where}: score_pattern captured {found[-1]!r}, which is not a number"
            ) from None
        return score * self.cfg.score_scale


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _retry_after(resp: httpx.Response) -> float | None:
    """Seconds a 429 / 503 asks to wait (`Retry-After` as seconds or as an HTTP date), else None."""
    value = resp.headers.get("Retry-After")
    if resp.status_code not in (429, 503) or value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() - datetime.now(UTC).timestamp()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _excerpt(value: Any, limit: int = 200) -> str:
    """`value` quoted on one line, its middle cut when long (a judge's verdict is at the end of its reply)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    if len(text) > limit:
        half = (limit - 5) // 2
        text = f"{text[:half]} ... {text[-half:]}"
    return repr(text)


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"kwargs.{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
