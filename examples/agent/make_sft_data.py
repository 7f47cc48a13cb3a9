"""Writes sft.jsonl and sft_eval.jsonl: conversations of calculator_agent.py's kind, rendered with the
presets' chat template, for the warm start that teaches a tiny preset the tool-call format (a real
model knows it already). Each problem gives two rows: the question -> a calc call; the question,
the call and the tool's result -> the answer. Run from the repository root:

    .venv/bin/python examples/agent/make_sft_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tidal.model.loading import build_char_tokenizer

from calculator_agent import TOOLS, calc

HERE = Path(__file__).parent


def rows(problems: list[tuple[int, int]]) -> list[dict[str, str]]:
    tok = build_char_tokenizer()

    def render(messages: list[dict]) -> str:
        return tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)

    out = []
    for a, b in problems:
        question = {"role": "user", "content": f"{a}+{b}="}
        call = {"id": "c", "type": "function", "function": {"name": "calc", "arguments": json.dumps({"x": f"{a}+{b}"})}}
        asked = {"role": "assistant", "content": None, "tool_calls": [call]}
        result = {"role": "tool", "tool_call_id": "c", "content": calc(f"{a}+{b}")}
        out.append({"prompt": render([question]), "answer": f'<tool_call>{{"name": "calc", "arguments": {{"x": "{a}+{b}"}}}}</tool_call>'})
        out.append({"prompt": render([question, asked, result]), "answer": str(a + b)})
    return out


if __name__ == "__main__":
    rng = random.Random(0)
    problems = rng.sample([(a, b) for a in range(100) for b in range(100)], 1200)  # as data.source arithmetic
    for name, part in (("sft.jsonl", problems[:1000]), ("sft_eval.jsonl", problems[1000:])):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows(part)))
