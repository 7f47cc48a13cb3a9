"""`remote_judge` against a real HTTP server on 127.0.0.1: both API styles, retries, limits, auth, the scorer."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tidal.config import RewardsConfig, RewardSpec
from tidal.rewards import RewardResult, RewardScorer
from tidal.rewards.remote import RemoteJudge, RemoteJudgeError
from tidal.telemetry.metrics import values
from tidal.types import Sample

pytestmark = pytest.mark.integration

# Small enough that every test finishes in well under a second or two.
FAST = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.05}


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    """JSON-encoded unless a str."""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any
    client_port: int


class JudgeServer:
    """A scripted judge: request k gets `script[k]` while the script lasts, then `default`.

    `default` is a Reply or a function of the request's body returning one.
    """

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.default: Reply | Callable[[Any], Reply] = Reply(body={"score": 1.0})
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/score"

    def stop(self) -> None:
        self._stop.set()  # Wakes handlers sleeping in a slow reply.
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        body = json.loads(raw) if raw else None
        with self._lock:
            self.seen.append(Seen(handler.path, dict(handler.headers), body, handler.client_address[1]))
            k = len(self.seen) - 1
            reply = self.script[k] if k < len(self.script) else self.default
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if not isinstance(reply, Reply):
            reply = reply(body)
        self._stop.wait(reply.delay_s)
        # Counted out before the reply is sent: once the client has it, it may send the next request,
        # which must not overlap this one in the count.
        with self._lock:
            self.in_flight -= 1
        data = (reply.body if isinstance(reply.body, str) else json.dumps(reply.body)).encode()
        try:
            handler.send_response(reply.status)
            for k, v in {"Content-Type": "application/json", **reply.headers}.items():
                handler.send_header(k, v)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:  # The client gave up (a timeout test); nothing to answer.
            pass

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real judge servers do

            def do_POST(self) -> None:  # noqa: N802 (the stdlib's naming)
                server._respond(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def server() -> Iterator[JudgeServer]:
    s = JudgeServer()
    yield s
    s.stop()


def make_sample(text: str = "19", **row: Any) -> Sample:
    return Sample(
        group_id=0,
        prompt_ids=[1],
        response_ids=[2],
        loss_mask=[1],
        logp_mu=[-0.1],
        finish_reason="stop",
        version=0,
        versions=[0],
        text=text,
        row={"prompt": "12+7=", "answer": "19", **row},
    )


def chat_reply(content: str | None, finish_reason: str = "stop") -> dict[str, Any]:
    message = {"role": "assistant", "content": content}
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
    }


def call(judge: RemoteJudge, samples: list[Sample], sequential: bool = False) -> list[Any]:
    """Each sample's result or exception, all calls at once (or one after another) on a fresh loop."""

    async def main() -> list[Any]:
        try:
            if sequential:
                return [await judge(s, s.row) for s in samples]
            return await asyncio.gather(*(judge(s, s.row) for s in samples), return_exceptions=True)
        finally:
            await judge.aclose()

    return asyncio.run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------ json api


def test_json_score_request_and_keep_alive(server: JudgeServer) -> None:
    server.default = Reply(body={"score": 0.75})
    judge = RemoteJudge(url=server.url, **FAST)
    samples = [make_sample("19", level=2), make_sample("20"), make_sample("21")]
    assert call(judge, samples, sequential=True) == [RewardResult(0.75, {})] * 3
    assert server.seen[0].path == "/score"
    assert server.seen[0].body == {
        "prompt": "12+7=",
        "completion": "19",
        "answer": "19",
        "row": {"prompt": "12+7=", "answer": "19", "level": 2},
    }
    assert [s.body["completion"] for s in server.seen] == ["19", "20", "21"]
    assert len({s.client_port for s in server.seen}) == 1  # one connection, kept alive


def test_json_sub_scores(server: JudgeServer) -> None:
    server.default = Reply(body={"score": 0.5, "sub_scores": {"format": 1.0, "correct": 0}})
    [result] = call(RemoteJudge(url=server.url, **FAST), [make_sample()])
    assert result == RewardResult(0.5, {"format": 1.0, "correct": 0.0})


# ------------------------------------------------------------------------------------------ openai api


def test_openai_judge_scaled_score_and_request(server: JudgeServer) -> None:
    server.default = Reply(body=chat_reply("Score: 2 would be harsh; the sum is right.\n**Score:** 7"))
    judge = RemoteJudge(
        url=server.url,
        api="openai",
        model="judge-7b",
        system="Grade.",
        prompt_template="Q: {prompt} ({topic})\nRef: {answer}\nA: {completion}",
        score_scale=0.1,
        max_tokens=64,
        **FAST,
    )
    [score] = call(judge, [make_sample("19", topic="sums")])
    assert score == pytest.approx(0.7)  # the last match is the verdict
    assert server.seen[0].body == {
        "model": "judge-7b",
        "messages": [
            {"role": "system", "content": "Grade."},
            {"role": "user", "content": "Q: 12+7= (sums)\nRef: 19\nA: 19"},
        ],
        "temperature": 0,
        "max_tokens": 64,
    }


@pytest.mark.parametrize(
    ("api", "reply", "expected"),
    [
        ("openai", chat_reply("The response is fine, I think."), "no score found in the judge's reply: 'The response"),
        ("openai", chat_reply("Let me think step by", "length"), "cut off at max_tokens"),
        ("openai", chat_reply(None), "not a chat completion with text in choices[0].message.content"),
        ("openai", {"error": "nope"}, "not a chat completion"),
        ("json", {"reward": 1.0}, "no 'score' in the reward model's reply: '{\"reward\": 1.0}'"),
        ("json", {"score": "high"}, "the reply's 'score' is 'high', expected a number"),
        ("json", {"score": 1.0, "sub_scores": {"a": "b"}}, "'sub_scores' must map names to numbers"),
        ("json", "<html>proxy error</html>", "HTTP 200 but the reply is not JSON: '<html>proxy error</html>'"),
    ],
)
def test_unusable_reply_is_a_clear_error(server: JudgeServer, api: str, reply: Any, expected: str) -> None:
    server.default = Reply(body=reply)
    kwargs = {"model": "judge"} if api == "openai" else {}
    [err] = call(RemoteJudge(url=server.url, api=api, **kwargs, **FAST), [make_sample()])
    assert isinstance(err, RemoteJudgeError)
    assert expected in str(err)
    assert f"POST {server.url}" in str(err) and "\n" not in str(err)
    assert len(server.seen) == 1  # a bad reply is not retried


# ------------------------------------------------------------------------------------------ retries


def test_retries_5xx_then_succeeds(server: JudgeServer) -> None:
    server.script = [Reply(503, {"error": "loading"}), Reply(502, "bad gateway")]
    server.default = Reply(body={"score": 0.25})
    [result] = call(RemoteJudge(url=server.url, **FAST), [make_sample()])
    assert result == RewardResult(0.25, {})
    assert len(server.seen) == 3


@pytest.mark.parametrize(("retry_after", "max_backoff_s", "least_s"), [("0.4", 5.0, 0.4), ("3600", 0.3, 0.3)])
def test_429_honours_retry_after_capped(
    server: JudgeServer, retry_after: str, max_backoff_s: float, least_s: float
) -> None:
    server.script = [Reply(429, {"error": "slow down"}, headers={"Retry-After": retry_after})]
    server.default = Reply(body={"score": 1.0})
    judge = RemoteJudge(url=server.url, timeout_s=2.0, retries=1, backoff_s=0.001, max_backoff_s=max_backoff_s)
    start = time.perf_counter()
    [result] = call(judge, [make_sample()])
    elapsed = time.perf_counter() - start
    assert result == RewardResult(1.0, {})
    assert len(server.seen) == 2
    # Without the header the wait would be about backoff_s (1 ms); with it, capped, not an hour.
    assert least_s <= elapsed < least_s + 1.5


def test_4xx_raises_at_once(server: JudgeServer) -> None:
    server.default = Reply(400, {"error": "unknown field"})
    [err] = call(RemoteJudge(url=server.url, **FAST), [make_sample()])
    assert isinstance(err, RemoteJudgeError)
    assert (
        str(err) == f"""POST {server.url}: HTTP 400 after 1 attempt(s), not retried: '{{"error": "unknown field"}}'"""
    )
    assert len(server.seen) == 1


def test_openai_404_hints_at_the_full_url(server: JudgeServer) -> None:
    server.default = Reply(404, {"detail": "Not Found"})
    [err] = call(RemoteJudge(url=server.url, api="openai", model="m", **FAST), [make_sample()])
    assert isinstance(err, RemoteJudgeError)
    assert "HTTP 404 after 1 attempt(s), not retried (api 'openai' wants the full URL" in str(err)
    assert len(server.seen) == 1


def test_5xx_retries_exhausted(server: JudgeServer) -> None:
    server.default = Reply(500, {"error": "CUDA out of memory"})
    [err] = call(RemoteJudge(url=server.url, **FAST), [make_sample()])
    assert isinstance(err, RemoteJudgeError)
    assert "HTTP 500" in str(err) and "CUDA out of memory" in str(err) and "attempt 3 of 3, giving up" in str(err)
    assert len(server.seen) == 3


def test_slow_server_times_out_within_bound(server: JudgeServer) -> None:
    server.default = Reply(body={"score": 1.0}, delay_s=5.0)
    judge = RemoteJudge(url=server.url, timeout_s=0.2, retries=2, backoff_s=0.01, max_backoff_s=0.05)
    start = time.perf_counter()
    [err] = call(judge, [make_sample()])
    elapsed = time.perf_counter() - start
    assert isinstance(err, RemoteJudgeError)
    assert "timed out after 0.2s (attempt 3 of 3, giving up)" in str(err)
    assert 0.6 <= elapsed < 2.0  # three attempts of 0.2 s plus short backoffs, never the server's 5 s
    assert len(server.seen) == 3


def test_connection_refused_is_retried_then_raises() -> None:
    url = f"http://127.0.0.1:{free_port()}/score"
    [err] = call(RemoteJudge(url=url, timeout_s=1.0, retries=1, backoff_s=0.01), [make_sample()])
    assert isinstance(err, RemoteJudgeError)
    assert f"POST {url}: ConnectError" in str(err) and "attempt 2 of 2" in str(err)


# ------------------------------------------------------------------------------------------ limits, auth


def test_max_concurrency_bounds_requests_in_flight(server: JudgeServer) -> None:
    server.default = Reply(body={"score": 1.0}, delay_s=0.1)
    judge = RemoteJudge(url=server.url, max_concurrency=2, **FAST)
    results = call(judge, [make_sample(str(i)) for i in range(10)])
    assert results == [RewardResult(1.0, {})] * 10
    assert len(server.seen) == 10
    assert server.max_in_flight == 2


def test_bearer_token_from_env_and_headers(server: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDAL_TEST_JUDGE_KEY", "sk-test-123")
    judge = RemoteJudge(url=server.url, api_key_env="TIDAL_TEST_JUDGE_KEY", headers={"X-Team": "rl"}, **FAST)
    call(judge, [make_sample()])
    headers = {k.lower(): v for k, v in server.seen[0].headers.items()}
    assert headers["authorization"] == "Bearer sk-test-123"
    assert headers["x-team"] == "rl"
    assert headers["content-type"] == "application/json"


def test_missing_api_key_env_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIDAL_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="'TIDAL_TEST_JUDGE_KEY', which is unset or empty"):
        RemoteJudge(url="http://127.0.0.1:9/score", api_key_env="TIDAL_TEST_JUDGE_KEY")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "kwargs.url: Field required"),
        ({"url": "127.0.0.1:8000/score"}, "url must start with http:// or https://"),
        ({"url": "http://h/v1/chat/completions", "api": "openai"}, "api 'openai' needs kwargs.model"),
        ({"url": "http://h/score", "score_scale": 0.1}, "score_scale only apply to api 'openai'"),
        ({"url": "http://h", "api": "openai", "model": "m", "score_pattern": r"\d+"}, "exactly one capturing group"),
        (
            {"url": "http://h", "api": "openai", "model": "m", "prompt_template": "{prompt}"},
            "must contain {completion}",
        ),
        ({"url": "http://h", "api": "openai", "model": "m", "prompt_template": "{completion} {0}"}, "must be named"),
        ({"url": "http://h/score", "retries": -1}, "kwargs.retries: Input should be greater than or equal to 0"),
        ({"url": "http://h/score", "timeout": 3}, "kwargs.timeout: Extra inputs are not permitted"),
    ],
)
def test_bad_kwargs_fail_at_construction(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError) as info:
        RemoteJudge(**kwargs)
    assert expected in str(info.value)


def test_template_column_missing_from_row(server: JudgeServer) -> None:
    judge = RemoteJudge(url=server.url, api="openai", model="m", prompt_template="{completion} {rubric}", **FAST)
    [err] = call(judge, [make_sample()])
    assert isinstance(err, ValueError)
    assert "prompt_template names {rubric}" in str(err) and "['answer', 'prompt']" in str(err)
    assert server.seen == []


# ------------------------------------------------------------------------------------------ through the scorer


def test_through_reward_scorer_records_server_errors(server: JudgeServer) -> None:
    def judge_by_text(body: Any) -> Reply:
        if body["completion"] == "boom":
            return Reply(500, {"error": "judge crashed"})
        correct = float(body["completion"] == body["answer"])
        return Reply(body={"score": correct, "sub_scores": {"length": float(len(body["completion"]))}})

    server.default = judge_by_text
    kwargs = {"url": server.url, "timeout_s": 1.0, "retries": 1, "backoff_s": 0.01, "max_concurrency": 4}
    cfg = RewardsConfig(
        functions=[RewardSpec(path="tidal.rewards.remote:RemoteJudge", kwargs=kwargs)],
        timeout_s=5.0,
        failure_reward=-1.0,
    )
    samples = [make_sample("19"), make_sample("20"), make_sample("boom"), make_sample("19")]
    with RewardScorer(cfg) as scorer:
        metrics = values(scorer.score(samples))
        assert scorer.names == ["RemoteJudge"]
        metrics_again = values(scorer.score(samples[:2]))  # the client made on the scorer's loop serves a second batch
        [judge] = [r.fn for r in scorer._rewards]
        assert judge._states != {}  # its HTTP client, made on the scorer's loop
    assert judge._states == {}  # closing the scorer closed the judge's client
    assert [s.reward for s in samples] == [1.0, 0.0, -1.0, 1.0]
    assert samples[0].scores == {"RemoteJudge": 1.0, "RemoteJudge/length": 2.0}
    assert [s.reward_errors for s in samples[:2] + samples[3:]] == [[], [], []]
    [error] = samples[2].reward_errors
    assert error.startswith("RemoteJudge: raised RemoteJudgeError: POST ")
    assert "HTTP 500" in error and "judge crashed" in error and "attempt 2 of 2" in error
    assert metrics["reward/failed"] == 1.0 and metrics["reward/failed_exception"] == 1.0
    assert metrics["reward/mean"] == pytest.approx(0.25)
    assert metrics_again["reward/failed"] == 0.0
    assert len(server.seen) == 4 + 1 + 2  # one retry of the failing sample
