"""Built-in rewards, by the name a config gives them in `rewards.functions[i].name`.

Functions take their kwargs on every call; classes are built once at start-up with the spec's kwargs
(so a bad regex or a missing dependency fails then, not mid-run) and are called with (sample, row).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from numbers import Real
from typing import Any, Literal

from tidal.data import exact_match as _exact_match
from tidal.data import parse_int_answer
from tidal.rewards.base import RewardFn
from tidal.rewards.remote import RemoteJudge
from tidal.types import Sample


def exact_match(sample: Sample, row: dict[str, Any], answer_field: str = "answer") -> float:
    """1.0 if the completion, stripped, equals the row's `answer_field` (as a string), stripped."""
    return float(_exact_match(sample.text, str(row[answer_field])))


def arithmetic(sample: Sample, row: dict[str, Any]) -> float:
    """Verifier of the arithmetic task: 1.0 if the completion is exactly the integer answer, e.g. `19` for `12+7=`.

    `parse_int_answer` alone would accept `19 apples`; the exact match rejects text after the number,
    so the policy learns to stop.
    """
    answer = str(row["answer"])
    if not _exact_match(sample.text, answer):  # first: a wrong completion never parses the gold answer
        return 0.0
    value = parse_int_answer(sample.text)
    return float(value is not None and value == int(answer))


class Regex:
    """Format reward: `score` when the completion matches `pattern`, else 0.0.

    `mode="fullmatch"` needs the whole completion to match; `"search"` any part of it. Inline flags
    work as usual, e.g. `(?s)` to let `.` match newlines.
    """

    def __init__(
        self, pattern: str | None = None, mode: Literal["fullmatch", "search"] = "fullmatch", score: float = 1.0
    ) -> None:
        # `pattern` defaults to None only to say what is missing in words rather than with a TypeError.
        if pattern is None:
            raise ValueError("the regex reward needs kwargs.pattern (a Python regular expression)")
        if not isinstance(pattern, str):
            raise ValueError(f"pattern must be a string, got {type(pattern).__name__}")
        if mode not in ("fullmatch", "search"):
            raise ValueError(f"mode must be 'fullmatch' or 'search', got {mode!r}")
        if not isinstance(score, Real) or isinstance(score, bool):
            raise ValueError(f"score must be a number, got {score!r}")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"invalid pattern {pattern!r}: {e}") from None
        self._match = regex.fullmatch if mode == "fullmatch" else regex.search
        self.score = float(score)

    def __call__(self, sample: Sample, row: dict[str, Any]) -> float:
        return self.score if self._match(sample.text) else 0.0


class MathVerify:
    """1.0 if the completion's final answer is mathematically equal to the row's answer (HF `math_verify`).

    Handles `\\boxed{}`, `$...$` LaTeX and plain numbers or expressions, e.g. `\\boxed{\\frac{1}{2}}`
    against `0.5`. A completion with nothing to parse scores 0.0; a gold answer that does not parse
    raises (recorded as a failed call: that is a data problem, not a wrong answer).
    """

    def __init__(self, answer_field: str = "answer") -> None:
        # Imported here, at start-up, so that sympy's import cost and a missing package show up
        # before the run instead of inside the first timed reward call.
        import math_verify
        import math_verify.grader
        import math_verify.parser

        # math_verify warns once that its timeouts are off; we turn them off on purpose (below).
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        self._mv = math_verify
        self.answer_field = answer_field

    def __call__(self, sample: Sample, row: dict[str, Any]) -> float:
        # Timeouts off: math_verify's use signal.alarm, which raises outside the main thread, and the
        # scorer bounds each call itself (killing a pool process past its timeout).
        gold_text = str(row[self.answer_field])
        # A bare gold answer is boxed so that all of it is parsed as LaTeX: raw, `1+x` parses as 1
        # and `\sqrt{2}` not at all.
        is_bare = "$" not in gold_text and "\\boxed" not in gold_text
        gold = self._mv.parse(f"\\boxed{{{gold_text}}}" if is_bare else gold_text, parsing_timeout=None)
        if not gold:
            raise ValueError(f"cannot parse the gold answer {gold_text!r}")
        pred = self._mv.parse(sample.text, parsing_timeout=None)
        if not pred:
            return 0.0
        return float(self._mv.verify(gold, pred, timeout_seconds=None))


BUILTINS: dict[str, RewardFn | Callable[..., RewardFn]] = {
    "exact_match": exact_match,
    "arithmetic": arithmetic,
    "regex": Regex,
    "math_verify": MathVerify,
    "remote_judge": RemoteJudge,
}
"""Built-in rewards by name: functions, or classes built once with the spec's kwargs."""
