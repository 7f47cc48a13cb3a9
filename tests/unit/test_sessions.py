"""Token in, token out (`tidal.rollout.sessions`): an agent's chat requests become samples of exactly
the tokens the model saw and generated. The model here is a script of answers (pure logic); the
tokenizer is the presets' own, with chat templates written to behave as real ones do: an
end-of-turn trailer the model does not generate (Qwen's newline after `<|im_end|>`), tool calls
re-serialized from JSON, earlier reasoning dropped from the history."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tidal.model.loading import build_char_tokenizer
from tidal.rollout.sessions import Prompt, Renderer, Session
from tidal.types import Completion

pytestmark = pytest.mark.unit

# Like Qwen3's: a newline after each end of turn, tool calls rendered from their parsed JSON, tools
# listed up front, and (with `strip`) reasoning dropped from every answer before the last user turn.
TEMPLATE = (
    "{% if tools %}tools:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'tool' %}<|user|>result: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% set text = m['content'] or '' %}"
    "{% if strip and '</think>' in text and not loop.last %}{% set text = text.split('</think>')[-1] %}{% endif %}"
    "{{ text }}"
    "{% for c in m.get('tool_calls') or [] %}call {{ c['function']['name'] }}"
    "({{ c['function']['arguments'] | tojson }}){% endfor %}<eos>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer(strip: bool = False) -> Any:
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE.replace("strip and", "true and" if strip else "false and")
    return tok


class Agent:
    """Sends requests as an OpenAI client would; the model's turns are scripted texts, tokenized and
    given made-up log-probs (version = turn); what each request's prompt was is kept."""

    def __init__(self, tok: Any, answers: list[str], tools: list[dict] | None = None) -> None:
        self.tok, self.answers, self.tools = tok, iter(answers), tools
        self.session = Session(Renderer(tok))
        self.prompts: list[Prompt] = []
        self.generated: list[list[int]] = []
        self.turn = 0

    def ask(self, messages: list[dict]) -> dict:
        prompt = self.session.prompt(messages, self.tools)
        text = next(self.answers)
        ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
        completion = Completion(
            prompt_ids=prompt.ids,
            token_ids=ids,
            text=text,
            finish_reason="stop",
            logprobs=[-0.01 * (self.turn + 1) - 0.001 * i for i in range(len(ids))],
            version=self.turn,
            versions=[self.turn] * len(ids),
        )
        answer = parse(text)
        self.session.record(prompt, completion, copy.deepcopy(messages), answer)
        self.prompts.append(prompt)
        self.generated.append(ids)
        self.turn += 1
        return copy.deepcopy(answer)


def parse(text: str) -> dict:
    """The answer as the API returns it: `call NAME(ARGS)` becomes a tool call (a tool parser's job)."""
    if text.startswith("call "):
        name, args = text.removeprefix("call ").split("(", 1)
        call = {"id": "c1", "type": "function", "function": {"name": name, "arguments": args.removesuffix(")")}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"role": "assistant", "content": text}


def check_token_exact(agent: Agent) -> None:
    """Every chain is the prompt the model saw at its first turn, then each turn's generated ids
    (loss mask 1, their log-probs and versions) with the ids inserted between turns (loss mask 0);
    and each later turn's prompt, as the model saw it, is the chain's tokens up to that turn."""
    turns = {id(c): [] for c in agent.session.chains}
    for prompt, ids in zip(agent.prompts, agent.generated, strict=True):
        chain = prompt.chain or next(c for c in agent.session.chains if c.prompt_ids == prompt.ids and not turns[id(c)])
        turns[id(chain)].append((prompt, ids))
    for chain in agent.session.chains:
        assert len(chain.response_ids) == len(chain.loss_mask) == len(chain.logp_mu) == len(chain.versions)
        full = chain.prompt_ids + chain.response_ids
        mask = [0] * len(chain.prompt_ids) + chain.loss_mask
        trained = [t for t, m in zip(full, mask, strict=True) if m]
        assert trained == [t for _, ids in turns[id(chain)] for t in ids]  # exactly what was generated
        for prompt, ids in turns[id(chain)]:
            n = len(prompt.ids)
            assert full[:n] == prompt.ids  # what the model saw at that turn, token for token
            assert full[n : n + len(ids)] == ids and all(mask[n : n + len(ids)])
            assert not any(mask[n - len(prompt.inserted) : n])  # tool and user tokens are not trained


def test_a_tool_using_conversation_is_one_sample_of_the_generated_tokens() -> None:
    tok = tokenizer()
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    agent = Agent(tok, ['call add({"a":1,  "b":2})', 'call add({"a":3,"b":4})', "The sum is 10."], tools)
    messages = [{"role": "user", "content": "add 1+2+3+4"}]
    for result in ("3", "10", None):
        answer = agent.ask(messages)
        messages += [answer] + ([{"role": "tool", "tool_call_id": "c1", "content": result}] if result else [])
    session = agent.session
    assert len(session.chains) == 1 and session.splits == 0 and session.chains[0].turns == 3
    check_token_exact(agent)
    chain = session.chains[0]
    text = tok.decode(chain.prompt_ids + chain.response_ids)
    # The model's own spacing is kept where the template would re-serialize the call's JSON ...
    assert 'call add({"a":1,  "b":2})<eos>\n<|user|>result: 3\n<|assistant|>' in text
    assert "{\\u0022a" not in text and '"{\\"a\\": 1' not in text
    # ... and the log-probs and versions of the generated tokens are the engine's.
    mask = chain.loss_mask
    per_turn = [[turn] * len(ids) for turn, ids in enumerate(agent.generated)]
    assert [v for v, m in zip(chain.versions, mask, strict=True) if m] == sum(per_turn, [])
    assert all(lp < 0 for lp, m in zip(chain.logp_mu, mask, strict=True) if m)
    assert all(lp == 0 for lp, m in zip(chain.logp_mu, mask, strict=True) if not m)


def test_the_trailer_the_model_did_not_generate_is_inserted_not_trained() -> None:
    """The template ends a turn with `<eos>` and a newline; the model generated the `<eos>` only."""
    agent = Agent(tokenizer(), ["four", "five"])
    messages = [{"role": "user", "content": "2+2"}]
    messages += [agent.ask(messages), {"role": "user", "content": "and 2+3?"}]
    agent.ask(messages)
    inserted = agent.prompts[1].inserted
    assert agent.tok.decode(inserted) == "\n<|user|>and 2+3?\n<|assistant|>"
    check_token_exact(agent)


def test_a_template_that_drops_earlier_reasoning_splits_the_episode() -> None:
    """Qwen3's template drops an answer's reasoning once a user turn follows it: the history the
    model would see next is not the one it generated after, so the episode becomes two samples,
    each of exactly the tokens generated and seen."""
    tok = tokenizer(strip=True)
    agent = Agent(tok, ["<think>2 and 2</think>four", "<think>2 and 3</think>five"])
    messages = [{"role": "user", "content": "2+2"}]
    messages += [agent.ask(messages), {"role": "user", "content": "and 2+3?"}]
    agent.ask(messages)
    assert len(agent.session.chains) == 2 and agent.session.splits == 1
    second = agent.session.chains[1]
    assert "2 and 2" not in tok.decode(second.prompt_ids)  # the re-rendered history, as the model saw it
    check_token_exact(agent)


def test_an_edited_answer_is_never_trained_on() -> None:
    """An agent that rewrites the model's answer before sending it back starts a new sample: the
    edited text is in its prompt (loss mask 0), never among the trained tokens."""
    tok = tokenizer()
    agent = Agent(tok, ["fuor", "five"])
    messages = [{"role": "user", "content": "2+2"}]
    answer = agent.ask(messages)
    answer["content"] = "four"  # "corrected" by the agent
    messages += [answer, {"role": "user", "content": "and 2+3?"}]
    agent.ask(messages)
    assert agent.session.splits == 1
    for chain in agent.session.chains:
        trained = tok.decode([t for t, m in zip(chain.response_ids, chain.loss_mask, strict=True) if m])
        assert "four" not in trained
    check_token_exact(agent)


def test_a_fork_or_other_tools_start_a_new_chain_and_the_original_goes_on() -> None:
    tok = tokenizer()
    agent = Agent(tok, ["four", "again four", "five"])
    first = [{"role": "user", "content": "2+2"}]
    answer = agent.ask(first)
    agent.ask(first)  # the same question again: a fork, not a continuation
    agent.ask([*first, answer, {"role": "user", "content": "and 2+3?"}])  # extends the first chain
    chains = agent.session.chains
    assert len(chains) == 2 and [c.turns for c in chains] == [2, 1]
    check_token_exact(agent)
    tools = [{"type": "function", "function": {"name": "add"}}]
    assert agent.session.prompt([*first, answer, {"role": "user", "content": "x"}], tools).chain is None


def test_tool_calls_compare_by_name_and_parsed_arguments() -> None:
    from tidal.rollout.sessions import same_message

    sent = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": '{"a": 1}'}}],
    }
    back = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "y", "function": {"name": "f", "arguments": '{"a":1}'}}],
    }
    assert same_message(sent, back)
    other = json.loads(json.dumps(back))
    other["tool_calls"][0]["function"]["arguments"] = '{"a": 2}'
    assert not same_message(sent, other)
