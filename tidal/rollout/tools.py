"""Tool calls in the model's text, parsed into OpenAI `tool_calls` for the agent endpoint (issue 31).

A chat template renders the request's `tools` and earlier tool calls in the model's own format; the
model's answer comes back as text that may hold calls in that format. A `ToolParser` turns it into
the assistant message the OpenAI API returns: `content` (the text before the calls) and
`tool_calls` (`{"id", "type": "function", "function": {"name", "arguments": JSON text}}`).

A call the parser cannot read (broken JSON, no name, a tool the request did not offer) is an error
of the model's: the answer is returned as plain content, as vLLM's server and the OpenAI API return a
malformed call, and the error is counted on the episode (`tool_parse_errors`). Each parser reads
its format; `parse_answer` checks the names against the request's tools for all of them.

Parsers, by `rollout.endpoint.tool_parser`:
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the format of Qwen3's chat
  template and of the presets' (`tidal.model.loading.CHAT_TEMPLATE`).
- `template`: the tokenizer's own `response_template` (transformers' `parse_response`), which a
  model's hub tokenizer may ship.
- any other name: vLLM's tool parser of that name (`glm45` for GLM-4.5 and GLM-5, `qwen3_xml`, ...),
  when vLLM is installed.
- `auto`: `template` when the tokenizer has a response template, else `hermes`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Parsed:
    """An answer's text as an OpenAI assistant message, and what could not be parsed."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    """Why calls in the text could not be read (the text is then the content, unparsed)."""

    def message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class ToolParser(Protocol):
    def parse(self, text: str, tools: list[dict[str, Any]] | None) -> Parsed: ...


def openai_call(name: str, arguments: Any) -> dict[str, Any]:
    """One OpenAI `tool_calls` entry; `arguments` as JSON text (how the API sends them)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def offered(tools: list[dict[str, Any]] | None) -> set[str]:
    """Names of the functions a request offers."""
    return {t.get("function", t).get("name") for t in tools or []}


def _unparsed(text: str, why: str) -> Parsed:
    return Parsed(text, [], why)


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen3, the presets)."""

    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)

    def parse(self, text: str, tools: list[dict[str, Any]] | None) -> Parsed:
        start = text.find("<tool_call>")
        if start < 0:
            return Parsed(text)
        calls = []
        for body in self._CALL.findall(text[start:]):
            try:
                call = json.loads(body.strip())
            except json.JSONDecodeError as e:
                return _unparsed(text, f"a tool call is not JSON ({e.msg})")
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return _unparsed(text, "a tool call has no name")
            calls.append(openai_call(call["name"], call.get("arguments", {})))
        return Parsed(text[:start].strip() or None, calls)


class TemplateParser:
    """The tokenizer's own `response_template`, through transformers' `parse_response`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def parse(self, text: str, tools: list[dict[str, Any]] | None) -> Parsed:
        try:
            message = self.tokenizer.parse_response(text, tools=tools)
        except Exception as e:  # the model's text, not the user's code: counted, returned unparsed
            return _unparsed(text, f"the response template could not parse it ({type(e).__name__}: {e})")
        calls = [c.get("function", c) for c in message.get("tool_calls") or []]
        content = message.get("content") or None
        return Parsed(content, [openai_call(f.get("name"), f.get("arguments", {})) for f in calls])


class VLLMParser:
    """vLLM's tool parser of a name (its `--tool-call-parser`), over the tokenizer."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        from vllm.tool_parsers import ToolParserManager

        self.tokenizer = tokenizer
        self.cls = ToolParserManager.get_tool_parser(name)

    def parse(self, text: str, tools: list[dict[str, Any]] | None) -> Parsed:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(model="tidal", messages=[], tools=tools or None)
        parser = self.cls(self.tokenizer, request.tools)
        try:
            info = parser.extract_tool_calls(text, request)
        except Exception as e:
            return _unparsed(text, f"vLLM's parser raised {type(e).__name__}: {e}")
        if not info.tools_called:
            # vLLM's parsers return a call they cannot read (or of a tool not offered) as content;
            # its opening tag is the parser's, or `<tool_call>` (Qwen3's, GLM-4.5's and GLM-5's).
            start = getattr(parser, "tool_call_start_token", None)
            if (start if isinstance(start, str) and start else "<tool_call>") in text:
                return _unparsed(text, "a tool call could not be parsed, or names a tool the request does not offer")
            return Parsed(info.content if info.content is not None else text)
        calls = [openai_call(c.function.name, c.function.arguments) for c in info.tool_calls]
        return Parsed(info.content or None, calls)


def parse_answer(parser: ToolParser, text: str, tools: list[dict[str, Any]] | None) -> Parsed:
    """An answer's text as the assistant message returned to the agent: `parser`'s reading of it,
    unless a call names a tool the request did not offer (then the text, unparsed, with the error)."""
    parsed = parser.parse(text, tools)
    if unknown := [c["function"]["name"] for c in parsed.tool_calls if c["function"]["name"] not in offered(tools)]:
        return _unparsed(text, f"a tool call names {unknown[0]!r}, which the request does not offer")
    return parsed


def tool_parser(name: str, tokenizer: Any) -> ToolParser:
    """The parser `rollout.endpoint.tool_parser` names (see the module docstring)."""
    if name == "auto":
        name = "template" if getattr(tokenizer, "response_template", None) else "hermes"
    if name == "hermes":
        return HermesParser()
    if name == "template":
        return TemplateParser(tokenizer)
    return VLLMParser(name, tokenizer)
