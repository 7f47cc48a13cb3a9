"""Tool calls in the model's text read back into OpenAI `tool_calls` (`tidal.rollout.tools`): the
presets' and Qwen3's format, vLLM's GLM-4.5 parser, and malformed calls returned as content and
counted; the presets' chat template renders what the parser reads."""

from __future__ import annotations

import json

import pytest

from tidal.model.loading import build_char_tokenizer
from tidal.rollout.tools import HermesParser, parse_answer, tool_parser

pytestmark = pytest.mark.unit

TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]


def test_hermes_calls_become_openai_tool_calls() -> None:
    text = 'Let me compute.<tool_call>{"name": "calc", "arguments": {"expr": "2+3"}}</tool_call>'
    parsed = HermesParser().parse(text, TOOLS)
    assert parsed.error is None and parsed.content == "Let me compute."
    (call,) = parsed.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "calc" and json.loads(call["function"]["arguments"]) == {"expr": "2+3"}
    assert parsed.message()["tool_calls"] == [call]
    assert HermesParser().parse("12", TOOLS).message() == {"role": "assistant", "content": "12"}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('<tool_call>{"name": "calc", "arguments": {"expr": </tool_call>', "not JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', "no name"),
        ('<tool_call>{"name": "shell", "arguments": {}}</tool_call>', "'shell', which the request does not offer"),
        ('<tool_call>{"name": "calc", "argum', "not JSON"),  # cut off at max_new_tokens
    ],
)
def test_a_malformed_call_is_returned_as_content_and_reported(text: str, why: str) -> None:
    parsed = parse_answer(HermesParser(), text, TOOLS)
    assert parsed.content == text and parsed.tool_calls == [] and why in (parsed.error or "")


def test_the_presets_template_renders_calls_the_parser_reads_back() -> None:
    tok = build_char_tokenizer()
    call = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"expr": "2+3"}'}}
    messages = [
        {"role": "user", "content": "2+3="},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith('# Tools\n{"name": "calc"') and text.endswith(
        "<tool_response>5</tool_response><|assistant|>"
    )
    answer = text[text.index("<|assistant|>") + len("<|assistant|>") : text.index("<eos>")]
    (parsed,) = HermesParser().parse(answer, TOOLS).tool_calls
    assert parsed["function"]["name"] == "calc" and json.loads(parsed["function"]["arguments"]) == {"expr": "2+3"}
    # Without tools the template is the one the presets always had.
    plain = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(plain, tokenize=False) == "<|user|>a<|assistant|>b<eos>"


def test_auto_picks_hermes_without_a_response_template() -> None:
    assert isinstance(tool_parser("auto", build_char_tokenizer()), HermesParser)


@pytest.mark.vllm
def test_vllms_glm45_parser_reads_glm_calls() -> None:
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer  # noqa: F401  (vLLM's parser takes any tokenizer)

    parser = tool_parser("glm45", build_char_tokenizer())
    text = "<tool_call>calc\n<arg_key>expr</arg_key>\n<arg_value>2+3</arg_value>\n</tool_call>"
    parsed = parse_answer(parser, text, TOOLS)
    assert parsed.error is None, parsed.error
    (call,) = parsed.tool_calls
    assert call["function"]["name"] == "calc" and json.loads(call["function"]["arguments"]) == {"expr": "2+3"}
    unknown = parse_answer(parser, text.replace("calc", "shell"), TOOLS)
    assert unknown.tool_calls == [] and "does not offer" in (unknown.error or "")
