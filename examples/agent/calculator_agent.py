"""An agent written for the OpenAI API, trained through tidal unchanged: it asks the model an
arithmetic question, offering a calculator tool, runs every tool call the model makes, and returns
1.0 when the model's final answer is right.

Nothing here is tidal's: the same function runs against any OpenAI-compatible server. tidal calls
`run` once per episode with a client bound to the episode's session on the rollout worker.
"""

from __future__ import annotations

import json
from typing import Any

import openai

TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]


def calc(expr: str) -> str:
    """The tool: a sum or difference of integers."""
    try:
        terms = expr.replace("-", "+-").split("+")
        return str(sum(int(t) for t in terms if t.strip()))
    except ValueError:
        return "error"


async def run(client: openai.AsyncOpenAI, row: dict[str, Any], max_turns: int = 3) -> float:
    messages: list[dict[str, Any]] = [{"role": "user", "content": row["prompt"]}]
    for _ in range(max_turns):
        reply = await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            return float((message.content or "").strip() == row["answer"])
        for call in message.tool_calls:
            try:
                expr = str(json.loads(call.function.arguments).get("x", ""))
            except (json.JSONDecodeError, AttributeError):
                expr = ""
            messages.append({"role": "tool", "tool_call_id": call.id, "content": calc(expr)})
    return 0.0
