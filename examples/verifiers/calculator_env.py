"""A verifiers environment (verifiers 0.3's classic API), as its authors would write it for prime-rl's
environment hub: addition problems, a calculator tool, and a rubric that rewards the right answer.
Nothing here is tidal's; tidal runs it with `envs: [{verifiers: ./examples/verifiers/calculator_env.py}]`.
"""

from __future__ import annotations

import random

import verifiers as vf
from datasets import Dataset


def calc(x: str) -> str:
    """Evaluates a sum or difference of integers.

    Args:
        x: the expression, e.g. 12+30
    """
    try:
        return str(sum(int(t) for t in x.replace("-", "+-").split("+") if t.strip()))
    except ValueError:
        return "error"


def problems(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        rows.append({"question": f"{a}+{b}=", "answer": str(a + b)})
    return Dataset.from_list(rows)


def correct(completion, answer, **kwargs) -> float:
    """1.0 when the last message of the model is the answer."""
    return float((completion[-1].content or "").strip() == answer)


def load_environment(num_train: int = 200, num_eval: int = 50, max_turns: int = 3, seed: int = 0) -> vf.Environment:
    return vf.ToolEnv(
        tools=[calc],
        dataset=problems(num_train, seed),
        eval_dataset=problems(num_eval, seed + 1),
        rubric=vf.Rubric(funcs=[correct], weights=[1.0]),
        max_turns=max_turns,
    )
