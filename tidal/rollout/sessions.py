"""Token in, token out: an agent's chat requests become samples of exactly the tokens the model saw
and generated, never a re-tokenization of the conversation (issue 31).

An agent talks to the model through an OpenAI-style chat API: each request sends the whole
conversation as messages, the model's earlier answers included, as the agent got them back. Training
on a fresh rendering of those messages is the bug peers' users keep hitting (verl #6719, #6854,
#6501; NeMo-RL #2821; TRL RFC #5974): the chat template re-renders an answer (tool calls
re-serialized, whitespace, reasoning dropped) and the tokenizer cuts the text differently than the
model generated it, so the trainer learns log-probs of tokens that were never sampled.

A `Session` keeps an episode's model calls as chains. A request extends a chain when its messages
are the chain's last request, then the answer tidal returned for it (unedited), then new messages,
and when the chat template renders that history as a prefix of the new conversation (it does not
rewrite it). Then the model's prompt is the chain's tokens so far (prompts and generated ids as they
were) followed by the tokens of what is new: the template's text after the answer (its end-of-turn
trailer, the tool results or user turn, the next generation prompt). Anything else starts a new
chain from a fresh rendering: a template that drops earlier reasoning, an agent that edits an answer
or forks the conversation. Each chain becomes one sample whose generated tokens have loss mask 1,
with their behavior log-probs and versions, and whose inserted tokens have loss mask 0; the
episode's samples share its reward, and `splits` counts the chains past the first.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from tidal.rollout.episodes import Episode
from tidal.types import Completion

Message = dict[str, Any]

_SENTINEL = "\x00tidal-sentinel\x00"


class Renderer:
    """Text and tokens of conversations: the tokenizer's own chat template (tools passed to it as
    the OpenAI request has them), and its encoding without added special tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def render(self, messages: list[Message], tools: list[dict] | None, generation_prompt: bool) -> str:
        kwargs = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def same_message(sent: Message, returned: Message) -> bool:
    """The agent sent back the answer tidal returned: same role, content and tool calls (by name and
    arguments, compared as parsed JSON; call ids and absent or empty fields are not compared)."""

    def calls(m: Message) -> list[tuple[str, Any]]:
        out = []
        for c in m.get("tool_calls") or []:
            fn = c.get("function", c)
            args = fn.get("arguments")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                pass
            out.append((fn.get("name"), args))
        return out

    return (
        sent.get("role") == returned.get("role")
        and (sent.get("content") or "") == (returned.get("content") or "")
        and calls(sent) == calls(returned)
    )


@dataclass
class Chain(Episode):
    """Model calls of which each extends the one before: one sample, kept as a multi-turn `Episode`
    keeps its tokens (`prompt_ids`: the first request's prompt, as the model saw it; the inserted
    tokens as observations)."""

    messages: list[Message] = field(default_factory=list)
    """The last request's messages followed by the answer returned for it."""
    tools: list[dict] | None = None
    text: str | None = None
    """A chain of `/v1/completions` requests: the last prompt's text followed by the answer's."""


@dataclass
class Prompt:
    """What the model is to continue for one request, and where its answer is to be recorded."""

    ids: list[int]
    chain: Chain | None
    """The chain the request extends (None: a new one starts with `ids`)."""
    inserted: list[int]
    """The ids appended to the chain's tokens (loss mask 0); empty for a new chain."""
    tools: list[dict] | None = None


class Session:
    """One episode's model calls, merged into token-exact samples (see the module docstring)."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        self.chains: list[Chain] = []
        self.calls = 0
        """Model calls answered."""
        self.refused = 0
        """Requests refused (malformed, past the context): the agent got an error."""
        self.tool_parse_errors = 0
        """Answers whose tool calls could not be parsed (returned as plain content)."""
        self.in_flight = 0
        """Model calls being answered now."""
        self.last_active = time.monotonic()
        """When the latest model call was answered (or the session opened): the agent is idle since."""

    @property
    def splits(self) -> int:
        """Chains past the first: where the conversation could not be kept as one sample."""
        return max(len(self.chains) - 1, 0)

    def prompt(self, messages: list[Message], tools: list[dict] | None = None) -> Prompt:
        """The model's prompt for a request of `messages` (and `tools`)."""
        full = self.renderer.render(messages, tools, generation_prompt=True)
        for chain in reversed(self.chains):
            inserted = self._continuation(chain, messages, tools, full)
            if inserted is not None:
                return Prompt(chain.context + inserted, chain, inserted, tools)
        return Prompt(self.renderer.encode(full), None, [], tools)

    def text_prompt(self, text: str) -> Prompt:
        """The model's prompt for a `/v1/completions` request of `text`: a chain's tokens followed by
        the tokens of the rest when `text` begins with that chain's last prompt and answer (the
        answer's text as returned; the tokens the model generated for it are kept, its end-of-text
        token included), else the tokens of `text`."""
        for chain in reversed(self.chains):
            if chain.text is not None and text.startswith(chain.text) and len(text) > len(chain.text):
                inserted = self.renderer.encode(text[len(chain.text) :])
                return Prompt(chain.context + inserted, chain, inserted)
        return Prompt(self.renderer.encode(text), None, [])

    def _continuation(
        self, chain: Chain, messages: list[Message], tools: list[dict] | None, full: str
    ) -> list[int] | None:
        """The ids to append to `chain` for `messages` to extend it, or None when they do not."""
        k = len(chain.messages)
        if tools != chain.tools or len(messages) <= k:
            return None
        if messages[: k - 1] != chain.messages[: k - 1] or not same_message(messages[k - 1], chain.messages[k - 1]):
            return None  # another history, or the answer edited
        history = self.renderer.render(messages[:k], tools, generation_prompt=False)
        if not full.startswith(history):
            return None  # the template rewrites the history once more follows it
        return self.renderer.encode(self._trailer(chain, messages[: k - 1], tools) + full[len(history) :])

    def _trailer(self, chain: Chain, before: list[Message], tools: list[dict] | None) -> str:
        """What the template puts after an answer's text that the model did not generate (Qwen's
        newline after `<|im_end|>`): the text after a sentinel answer, less its longest prefix that
        the generated text already ends with (the end-of-turn token the model sampled)."""
        rendered = self.renderer.render([*before, {"role": "assistant", "content": _SENTINEL}], tools, False)
        after = rendered[rendered.index(_SENTINEL) + len(_SENTINEL) :]
        generated = self.renderer.decode(chain.response_ids[chain.turn_start :])
        overlap = next((n for n in range(len(after), 0, -1) if generated.endswith(after[:n])), 0)
        return after[overlap:]

    def record(
        self,
        prompt: Prompt,
        completion: Completion,
        messages: list[Message] | None = None,
        answer: Message | None = None,
        text: str | None = None,
    ) -> None:
        """The model's `completion` of `prompt`: made for a chat request of `messages` and returned
        to the agent as `answer` (an assistant message), or for a completions request whose prompt
        and answer are `text`."""
        chain = prompt.chain
        if chain is None:
            chain = Chain(list(prompt.ids), tools=prompt.tools)
            self.chains.append(chain)
        else:
            chain.add_observation(prompt.inserted, completion.version)
        chain.add_turn(completion)
        self.calls += 1
        if text is not None:
            chain.text = text
        else:
            assert messages is not None and answer is not None
            chain.messages = [*messages, answer]
