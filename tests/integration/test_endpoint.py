"""The agent endpoint (`tidal.rollout.endpoint`) over the transformers engine, driven by the `openai`
package's async client as an agent would: concurrent multi-turn sessions whose recorded tokens and
log-probs are what a teacher-forced forward of the trajectory gives, the run's key and limits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest
import torch

from tidal.model.forward import completion_logprobs
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.rollout.endpoint import Batcher, Endpoint, Serving
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.types import SamplingParams

pytestmark = pytest.mark.integration

TOL = 1e-4  # the engine tests' tolerance on behavior log-probs against a forward
KEY = "run-key"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Endpoint, torch.nn.Module]]:
    path = materialize_preset("tiny-qwen3-moe", seed=0)
    model, tok = load_model(path), load_tokenizer(path)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    batcher = Batcher(TransformersEngine(model, tok)).start(Serving(params))
    endpoint = Endpoint(batcher, tok, "tiny", KEY, max_new_tokens=12, max_context_tokens=96).start()
    yield endpoint, model
    endpoint.stop()
    batcher.close()


async def conversation(endpoint: Endpoint, session: str, turns: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=endpoint.session_url(session), api_key=KEY)
    messages: list[dict] = [{"role": "user", "content": f"hello {session}"}]
    answers = []
    for turn in range(turns):
        reply = await client.chat.completions.create(model="tiny", messages=messages)
        answer = reply.choices[0].message
        answers.append(answer.content)
        messages += [{"role": "assistant", "content": answer.content}, {"role": "user", "content": f"next {turn}"}]
    return answers


def test_concurrent_agent_sessions_record_what_the_model_generated(served: tuple[Endpoint, torch.nn.Module]) -> None:
    endpoint, model = served

    async def agents() -> list[list[str]]:
        return await asyncio.gather(*(conversation(endpoint, f"ep{i}", 3) for i in range(4)))

    answers = asyncio.run(agents())
    assert [len(a) for a in answers] == [3] * 4
    for i in range(4):
        session = endpoint.sessions[f"ep{i}"]
        assert len(session.chains) == 1 and session.splits == 0  # each conversation one sample
        chain = session.chains[0]
        assert chain.turns == 3 and sum(chain.loss_mask) > 0
        (forward,) = completion_logprobs(model, [chain.prompt_ids], [chain.response_ids], pad_id=0)
        trained = torch.tensor(chain.loss_mask, dtype=torch.bool)
        # The behavior log-probs of the sampled tokens are the model's on the whole trajectory.
        torch.testing.assert_close(torch.tensor(chain.logp_mu)[trained], forward[trained], atol=TOL, rtol=0)
        assert set(chain.versions) == {0}


def test_the_key_the_models_and_the_context_limit(served: tuple[Endpoint, torch.nn.Module]) -> None:
    endpoint, _ = served

    async def calls() -> None:
        stranger = openai.AsyncOpenAI(base_url=endpoint.session_url("x"), api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            await stranger.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        client = openai.AsyncOpenAI(base_url=endpoint.session_url("y"), api_key=KEY)
        assert [m.id for m in (await client.models.list()).data] == ["tiny"]
        with pytest.raises(openai.BadRequestError, match="rollout.max_context_tokens"):
            await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 200}])
        with pytest.raises(openai.BadRequestError, match="malformed request"):
            await client.chat.completions.create(model="tiny", messages=[])
        short = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert short.usage.completion_tokens <= 2

    asyncio.run(calls())
    assert "x" not in endpoint.sessions  # refused before any session state


def test_streaming_text_completions_and_ended_episodes(served: tuple[Endpoint, torch.nn.Module]) -> None:
    endpoint, _ = served

    async def calls() -> None:
        client = openai.AsyncOpenAI(base_url=endpoint.session_url("s"), api_key=KEY)
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [c async for c in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        (chain,) = endpoint.sessions["s"].chains
        assert streamed == endpoint.tokenizer.decode(chain.response_ids, skip_special_tokens=True)
        text = await client.completions.create(model="tiny", prompt="1+1=", max_tokens=3)
        assert text.choices[0].text == endpoint.tokenizer.decode(
            endpoint.sessions["s"].chains[1].response_ids, skip_special_tokens=True
        )
        endpoint.open_sessions = False
        try:
            with pytest.raises(openai.NotFoundError, match="not running"):
                await openai.AsyncOpenAI(base_url=endpoint.session_url("gone"), api_key=KEY).completions.create(
                    model="tiny", prompt="1"
                )
        finally:
            endpoint.open_sessions = True

    asyncio.run(calls())
