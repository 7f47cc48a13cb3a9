"""Built-in environments, by the name a config gives them in `envs[i].name`.

- `arithmetic`: the built-in arithmetic task (exact integer answers).
- `math`: math problems with answers checked by the math-verify package (`\\boxed{}`, LaTeX, numbers).
- `calculator`: multi-turn arithmetic with a calculator tool: the model writes `<calc>12*34</calc>`,
  the env answers `<result>408</result>`, and a turn without a call is the final answer.
- `code`: the model writes a Python solution; the row's unit tests run in a sandbox (subprocess with
  time, memory and process limits, no network, its own temporary directory).
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

from tidal.envs.base import Env, MultiTurnEnv, Step
from tidal.rewards.base import RewardResult
from tidal.rewards.builtins import MathVerify, arithmetic
from tidal.types import Sample


class ArithmeticEnv(Env):
    """Prompts like `12+7=` as they are; reward 1.0 for exactly the integer answer."""

    def score(self, sample: Sample, row: dict[str, Any]) -> float:
        return arithmetic(sample, row)


class MathEnv(Env):
    """Math problems; reward 1.0 when the final answer equals the row's answer (math-verify).

    `instruction` is appended to each problem (e.g. asking for `\\boxed{}`); `answer_field` names the
    answer column.
    """

    def __init__(self, instruction: str = "", answer_field: str = "answer") -> None:
        self.instruction = instruction
        self.verify = MathVerify(answer_field)

    def prompt(self, row: dict[str, Any]) -> str:
        return str(row["prompt"]) + self.instruction

    def score(self, sample: Sample, row: dict[str, Any]) -> float:
        return self.verify(sample, row)


# ----------------------------------------------------------------------------------------- calculator

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CALL = re.compile(r"<calc>(.*?)</calc>", re.S)


def calculate(expr: str, max_abs: int = 10**12) -> int:
    """Value of an integer expression of + - * // % and parentheses; anything else raises ValueError.

    Parsed with `ast`, never `eval`: the expression is model output.
    """

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            value = node.value
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.FloorDiv | ast.Mod) and right == 0:
                raise ValueError("division by zero")
            value = _OPS[type(node.op)](left, right)
        else:
            raise ValueError(f"unsupported expression {ast.unparse(node)!r}")
        if abs(value) > max_abs:
            raise ValueError("number too large")
        return value

    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expr.strip()!r}") from None
    return ev(tree.body)


class CalculatorEnv(MultiTurnEnv):
    """Arithmetic with a calculator tool, over several turns.

    A turn that contains `<calc>EXPR</calc>` gets `<result>VALUE</result>` (or `<result>error</result>`)
    back; the first turn without a call is the final answer, rewarded 1.0 when it is exactly the
    integer answer, minus `call_cost` per call made. At most `max_turns` turns.
    """

    stop = ["</calc>"]

    def __init__(self, max_turns: int = 3, call_cost: float = 0.0) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        self.call_cost = call_cost

    def reset(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"answer": str(row["answer"]).strip(), "calls": 0}

    def step(self, state: dict[str, Any], text: str) -> Step:
        call = _CALL.search(text)
        if call is None:
            correct = text.strip() == state["answer"]
            return Step(
                reward=float(correct) - self.call_cost * state["calls"],
                done=True,
                info={"correct": float(correct), "calls": float(state["calls"])},
            )
        state["calls"] += 1
        try:
            result = str(calculate(call.group(1)))
        except ValueError:
            result = "error"
        return Step(observation=f"<result>{result}</result>")

    def is_correct(self, sample: Sample, row: dict[str, Any]) -> bool:
        return sample.env_info.get("correct", 0.0) > 0


# ----------------------------------------------------------------------------------------------- code

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The first fenced code block of `text` (```python ... ```), or the whole text without one."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


class CodeEnv(Env):
    """Python programming tasks; reward = the fraction of the row's unit tests that pass.

    The row's `tests_field` holds a list of test snippets (e.g. `assert add(2, 3) == 5`) or one string
    with one test per line. Each runs after the model's code in a sandbox (`tidal.envs.sandbox`):
    a subprocess in its own temporary directory with wall-clock, CPU, memory, file-size and process
    limits, no network, and no write access outside that directory. Keep `timeout_s` below
    `rewards.timeout_s`.
    """

    def __init__(
        self, tests_field: str = "tests", timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 16
    ) -> None:
        from tidal.envs.sandbox import SandboxLimits

        self.tests_field = tests_field
        self.limits = SandboxLimits(
            timeout_s=timeout_s, cpu_s=max(1, int(timeout_s) + 1), memory_mb=memory_mb, max_processes=max_processes
        )

    def score(self, sample: Sample, row: dict[str, Any]) -> RewardResult:
        from tidal.envs.sandbox import run_tests

        tests = row[self.tests_field]
        if isinstance(tests, str):
            tests = [t for t in tests.splitlines() if t.strip()]
        if not tests:
            raise ValueError(f"row has no tests in column {self.tests_field!r}")
        result = run_tests(extract_code(sample.text), list(tests), self.limits)
        return RewardResult(
            result.passed / max(result.total, 1), {"passed": float(result.passed), "timed_out": float(result.timed_out)}
        )


BUILTIN_ENVS: dict[str, type[Env]] = {
    "arithmetic": ArithmeticEnv,
    "math": MathEnv,
    "calculator": CalculatorEnv,
    "code": CodeEnv,
}
"""Built-in environments by name, built once per worker with the spec's kwargs."""
