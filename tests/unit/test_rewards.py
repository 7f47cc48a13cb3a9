from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
import types
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tidal.config import ConfigError, RewardsConfig, RewardSpec
from tidal.plugins import BoundedCalls
from tidal.rewards import RewardResult, RewardScorer, resolve_reward, resolve_rewards
from tidal.rewards.builtins import MathVerify, Regex, arithmetic, exact_match
from tidal.telemetry.metrics import values
from tidal.types import Sample

pytestmark = pytest.mark.unit


def make_sample(text: str = "19", answer: str = "19", **row: Any) -> Sample:
    return Sample(
        group_id=0,
        prompt_ids=[1],
        response_ids=[2],
        loss_mask=[1],
        logp_mu=[-0.1],
        finish_reason="stop",
        version=0,
        versions=[0],
        text=text,
        row={"prompt": "12+7=", "answer": answer, **row},
    )


def plugin_module(monkeypatch: pytest.MonkeyPatch, **attrs: Any) -> str:
    """Register an importable module holding `attrs`; returns its name for `name:attr` paths."""
    name = f"tidal_test_plugins_{len(sys.modules)}"
    module = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(module, k, v)
    monkeypatch.setitem(sys.modules, name, module)
    return name


# ------------------------------------------------------------------------------------------ built-ins


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [("19", "19", 1.0), (" 19\n", "19", 1.0), ("20", "19", 0.0), ("19 apples", "19", 0.0), ("", "19", 0.0)],
)
def test_exact_match(text: str, answer: str, expected: float) -> None:
    s = make_sample(text, answer)
    assert exact_match(s, s.row) == expected


def test_exact_match_answer_field_and_non_string_answer() -> None:
    s = make_sample("7", gold=7)
    assert exact_match(s, s.row, answer_field="gold") == 1.0
    assert exact_match(s, s.row) == 0.0  # compares with row["answer"] == "19"


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("19", "19", 1.0),
        ("19\n", "19", 1.0),
        ("-5", "-5", 1.0),
        ("20", "19", 0.0),
        ("19 apples", "19", 0.0),  # parse_int_answer alone would accept it
        ("019", "19", 0.0),
        ("nineteen", "19", 0.0),
        ("", "19", 0.0),
    ],
)
def test_arithmetic(text: str, answer: str, expected: float) -> None:
    s = make_sample(text, answer)
    assert arithmetic(s, s.row) == expected


def test_regex_modes_and_score() -> None:
    s = make_sample("<think>hm</think> 19")
    assert Regex(r"<think>.*</think> \d+")(s, s.row) == 1.0
    assert Regex(r"\d+")(s, s.row) == 0.0  # fullmatch: the whole completion
    assert Regex(r"\d+", mode="search")(s, s.row) == 1.0
    assert Regex(r"<answer>", mode="search", score=0.5)(s, s.row) == 0.0
    assert Regex(r".*19", score=0.5)(s, s.row) == 0.5


def test_regex_through_resolve_gets_no_kwargs_per_call() -> None:
    name, fn, kwargs = resolve_reward(RewardSpec(name="regex", kwargs={"pattern": r"\d+", "score": 0.25}), 0)
    s = make_sample("42")
    assert (name, kwargs) == ("regex", {})
    assert fn(s, s.row) == 0.25


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("$x=2$", "2", 1.0),
        ("So the total is 19.", "19", 1.0),
        ("\\boxed{x+1}", "1+x", 1.0),
        ("$\\sqrt{2}$", "\\sqrt{2}", 1.0),
        ("The answer is $\\frac{2}{3}$", "$\\frac{2}{3}$", 1.0),
        ("\\boxed{1}", "1+x", 0.0),
        ("The answer is \\boxed{3}", "2", 0.0),
        ("I do not know", "2", 0.0),
    ],
)
def test_math_verify(text: str, answer: str, expected: float) -> None:
    s = make_sample(text, answer)
    assert MathVerify()(s, s.row) == expected


def test_math_verify_unparseable_gold_raises() -> None:
    s = make_sample("\\boxed{2}", "")
    with pytest.raises(ValueError, match="cannot parse the gold answer"):
        MathVerify()(s, s.row)


def test_math_verify_runs_in_scorer_threads() -> None:
    # math_verify's default timeouts use signal.alarm, which raises outside the main thread.
    samples = [make_sample("\\boxed{\\frac{1}{2}}", "0.5"), make_sample("\\boxed{3}", "2")]
    with RewardScorer(RewardsConfig(functions=[RewardSpec(name="math_verify")])) as scorer:
        metrics = values(scorer.score(samples))
    assert [s.reward for s in samples] == [1.0, 0.0]
    assert [s.reward_errors for s in samples] == [[], []]
    assert metrics["reward/math_verify"] == 0.5 and metrics["reward/failed"] == 0.0


# --------------------------------------------------------------------------------------------- loading


REWARD_FILE = """
from tidal.rewards import RewardResult

def length_reward(sample, row, target=2):
    n = len(sample.text)
    return RewardResult(score=float(n == target), sub_scores={"length": float(n)})

class Judge:
    def __init__(self, bonus):
        self.bonus = bonus

    def __call__(self, sample, row):
        return self.bonus if sample.text == row["answer"] else 0.0

NOT_CALLABLE = 3
"""


def test_load_from_absolute_and_relative_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    monkeypatch.chdir(tmp_path)
    s = make_sample("19")
    for path in (f"{tmp_path}/my_reward.py:length_reward", "./my_reward.py:length_reward"):
        name, fn, kwargs = resolve_reward(RewardSpec(path=path, kwargs={"target": 2}), 0)
        assert (name, kwargs) == ("length_reward", {"target": 2})
        assert fn(s, s.row, **kwargs) == RewardResult(1.0, {"length": 2.0})


def test_load_class_is_built_once_with_kwargs(tmp_path: Path) -> None:
    (tmp_path / "judge.py").write_text(REWARD_FILE)
    name, fn, kwargs = resolve_reward(RewardSpec(path=f"{tmp_path}/judge.py:Judge", kwargs={"bonus": 0.7}), 0)
    s = make_sample("19")
    assert (name, kwargs) == ("Judge", {})
    assert fn(s, s.row) == 0.7


def test_load_from_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "tidal_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(REWARD_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    name, fn, _ = resolve_reward(RewardSpec(path="tidal_test_pkg.scores:length_reward"), 3)
    s = make_sample("ab")
    assert name == "length_reward"
    assert fn(s, s.row) == RewardResult(1.0, {"length": 2.0})


def test_duplicate_and_reserved_names_get_suffixes(monkeypatch: pytest.MonkeyPatch) -> None:
    def mean(sample: Sample, row: dict[str, Any]) -> float:
        return 0.0

    mod = plugin_module(monkeypatch, mean=mean)
    cfg = RewardsConfig(
        functions=[
            RewardSpec(name="exact_match"),
            RewardSpec(name="exact_match", kwargs={"answer_field": "prompt"}),
            RewardSpec(name="exact_match"),
            RewardSpec(path=f"{mod}:mean"),  # would overwrite the `reward/mean` metric
        ]
    )
    names = [name for name, _, _ in resolve_rewards(cfg)]
    assert names == ["exact_match", "exact_match_1", "exact_match_2", "mean_1"]


@pytest.mark.parametrize(
    ("spec", "file_text", "expected"),
    [
        (RewardSpec(path="./missing_reward.py:score"), None, "file ./missing_reward.py not found (looked for /"),
        (RewardSpec(path="{dir}/r.py:nope"), REWARD_FILE, "has no attribute 'nope' (it has: Judge, length_reward)"),
        (RewardSpec(path="{dir}/r.py:NOT_CALLABLE"), REWARD_FILE, "is not callable (it is of type int)"),
        (RewardSpec(path="{dir}/r.py"), REWARD_FILE, "missing ':' separator"),
        (RewardSpec(path="{dir}/r.py:"), REWARD_FILE, "missing ':' separator"),
        (RewardSpec(path="{dir}/r.py:a.b"), REWARD_FILE, "'a.b' after ':' is not a Python name"),
        (RewardSpec(path="{dir}/r.py:f"), "raise ValueError('bad\\nconfig')", "raised ValueError: bad config"),
        (RewardSpec(path="{dir}/r.py:f"), "def f(:\n", "raised SyntaxError: "),
        (RewardSpec(path="{dir}/r.py:f"), "import not_a_real_dep_xyz", "raised ModuleNotFoundError: No module named"),
        (RewardSpec(path="{dir}/r.txt:f"), "", "cannot load {dir}/r.txt as a Python module"),
        (RewardSpec(path="no_such_pkg_xyz.mod:f"), None, "module 'no_such_pkg_xyz' not found on sys.path"),
        (RewardSpec(path="{dir}/r.py:Judge"), REWARD_FILE, "building Judge with kwargs {} raised TypeError"),
        (RewardSpec(path="{dir}/r.py:C"), "class C:\n    pass\n", "instances of class C are not callable"),
        (RewardSpec(path="{dir}/r.py:f"), "def f(sample):\n    return 1\n", "cannot be called as fn(sample, row"),
        (
            RewardSpec(name="foo"),
            None,
            "is not a built-in reward (known: arithmetic, exact_match, math_verify, regex, remote_judge)",
        ),
        (RewardSpec(name="regex"), None, "raised ValueError: the regex reward needs kwargs.pattern"),
        (RewardSpec(name="regex", kwargs={"pattern": "("}), None, "invalid pattern '(': missing ), unterminated"),
        (RewardSpec(name="regex", kwargs={"pattern": "a", "mode": "match"}), None, "mode must be 'fullmatch' or"),
        (
            RewardSpec(name="exact_match", kwargs={"answer_feild": "x"}),
            None,
            "got an unexpected keyword argument 'answer_feild'",
        ),
    ],
)
def test_loading_errors_are_one_line_config_errors(
    spec: RewardSpec, file_text: str | None, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if spec.path is not None:
        spec = RewardSpec(path=spec.path.format(dir=tmp_path), kwargs=spec.kwargs)
        if file_text is not None:
            Path(spec.path.rpartition(":")[0] if ":" in spec.path else spec.path).write_text(file_text)
    cfg = RewardsConfig(functions=[RewardSpec(name="arithmetic"), spec])
    with pytest.raises(ConfigError) as info:
        resolve_rewards(cfg)
    msg = str(info.value)
    field = "name" if spec.name is not None else "path"
    assert msg.startswith(f"rewards.functions[1].{field} {spec.name or spec.path!r}")
    assert "\n" not in msg
    assert expected.replace("{dir}", str(tmp_path)) in msg


def test_failed_import_can_be_retried(tmp_path: Path) -> None:
    # A module whose import raised must not stay half-initialised in sys.modules.
    file = tmp_path / "flaky.py"
    file.write_text("raise RuntimeError('not yet')")
    with pytest.raises(ConfigError, match="raised RuntimeError: not yet"):
        resolve_reward(RewardSpec(path=f"{file}:f"), 0)
    file.write_text("def f(sample, row):\n    return 1.0\n")
    assert resolve_reward(RewardSpec(path=f"{file}:f"), 0)[0] == "f"


# --------------------------------------------------------------------------------------------- scoring


def test_weighted_sum_with_sub_scores_and_async(monkeypatch: pytest.MonkeyPatch) -> None:
    def shape(sample: Sample, row: dict[str, Any], target: int = 2) -> RewardResult:
        n = len(sample.text)
        return RewardResult(score=float(n == target), sub_scores={"length": float(n), "short": n < 3})

    async def judge(sample: Sample, row: dict[str, Any]) -> float:
        await asyncio.sleep(0.01)
        return 0.5 if sample.text == row["answer"] else 0.0

    mod = plugin_module(monkeypatch, shape=shape, judge=judge)
    cfg = RewardsConfig(
        functions=[
            RewardSpec(name="exact_match", weight=2.0),
            RewardSpec(path=f"{mod}:shape", weight=0.5, kwargs={"target": 2}),
            RewardSpec(path=f"{mod}:judge", weight=-1.0),
        ]
    )
    samples = [make_sample("19"), make_sample("123")]
    with RewardScorer(cfg) as scorer:
        assert scorer.names == ["exact_match", "shape", "judge"]
        metrics = values(scorer.score(samples))
    right, wrong = samples
    assert right.reward == pytest.approx(2.0 * 1.0 + 0.5 * 1.0 - 1.0 * 0.5)
    assert right.scores == {"exact_match": 1.0, "shape": 1.0, "shape/length": 2.0, "shape/short": 1.0, "judge": 0.5}
    assert wrong.reward == 0.0
    assert wrong.scores == {"exact_match": 0.0, "shape": 0.0, "shape/length": 3.0, "shape/short": 0.0, "judge": 0.0}
    assert right.reward_errors == [] and wrong.reward_errors == []
    assert metrics["reward/mean"] == pytest.approx(1.0)
    assert metrics["reward/std"] == pytest.approx(1.0)
    assert metrics["reward/exact_match"] == 0.5
    assert metrics["reward/shape/length"] == 2.5
    assert metrics["reward/judge"] == 0.25
    assert metrics["reward/failed"] == 0.0
    assert metrics["reward/score_time_s"] > 0.0


def test_failures_are_recorded_and_the_run_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    cancelled = threading.Event()

    def raises(sample: Sample, row: dict[str, Any]) -> float:
        raise ValueError("no answer\nin row")

    def sleeps(sample: Sample, row: dict[str, Any]) -> float:
        time.sleep(30)
        return 1.0

    def nan(sample: Sample, row: dict[str, Any]) -> float:
        return math.nan

    def wrong_type(sample: Sample, row: dict[str, Any]) -> str:
        return "1.0"

    async def hangs(sample: Sample, row: dict[str, Any]) -> float:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1.0

    fns = {"raises": raises, "sleeps": sleeps, "nan": nan, "wrong_type": wrong_type, "hangs": hangs}
    mod = plugin_module(monkeypatch, **fns)
    cfg = RewardsConfig(
        functions=[RewardSpec(name="exact_match"), *(RewardSpec(path=f"{mod}:{n}", weight=2.0) for n in fns)],
        timeout_s=0.3,
        failure_reward=-0.5,
    )
    samples = [make_sample("19"), make_sample("20")]
    start = time.perf_counter()
    with RewardScorer(cfg) as scorer:
        metrics = values(scorer.score(samples))
    # Bounded by the 0.3 s timeout (twice: timeouts are retried once), not the 30 s sleeps; the first
    # score in a process also waits for the reward processes' forkserver to import tidal (seconds).
    assert time.perf_counter() - start < 20.0
    assert cancelled.wait(timeout=1.0)
    for sample, em in zip(samples, [1.0, 0.0], strict=True):
        assert sample.scores == {"exact_match": em, **dict.fromkeys(fns, -0.5)}
        assert sample.reward == pytest.approx(em + 5 * 2.0 * -0.5)
        assert sample.reward_errors == [
            "raises: raised ValueError: no answer in row",  # not transient: not retried
            "sleeps: timed out after 0.3s (2 attempts)",
            "nan: returned NaN",
            "wrong_type: returned str, expected a number or RewardResult",
            "hangs: timed out after 0.3s (2 attempts)",
        ]
    assert metrics["reward/retried"] == 4.0
    assert metrics["reward/failed"] == 10.0
    assert metrics["reward/failed_timeout"] == 4.0
    assert metrics["reward/failed_exception"] == 2.0
    assert metrics["reward/failed_nan"] == 2.0
    assert metrics["reward/failed_type"] == 2.0
    assert metrics["reward/exact_match"] == 0.5
    assert metrics["reward/sleeps"] == -0.5


def _returns(value: Any) -> Any:
    return lambda sample, row: value


def test_result_values_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    returned: list[Any] = [True, 3, np.float32(0.25), RewardResult(1.0, {"x": math.inf}), RewardResult(1.0, {"x": "a"})]
    fns = {f"f{i}": _returns(v) for i, v in enumerate(returned)}
    mod = plugin_module(monkeypatch, **fns)
    cfg = RewardsConfig(functions=[RewardSpec(path=f"{mod}:{n}") for n in fns])
    sample = make_sample()
    with RewardScorer(cfg) as scorer:
        metrics = values(scorer.score([sample]))
    assert scorer.names == ["<lambda>", "<lambda>_1", "<lambda>_2", "<lambda>_3", "<lambda>_4"]
    assert list(sample.scores.values()) == [1.0, 3.0, 0.25, 0.0, 0.0]
    assert sample.reward_errors == [
        "<lambda>_3: returned inf in sub-score 'x'",
        "<lambda>_4: returned str in sub-score 'x', expected a number",
    ]
    assert (metrics["reward/failed_nan"], metrics["reward/failed_type"]) == (1.0, 1.0)


def test_hung_sync_reward_does_not_block_later_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    def sleeps(sample: Sample, row: dict[str, Any]) -> float:
        time.sleep(30)
        return 1.0

    mod = plugin_module(monkeypatch, sleeps=sleeps)
    cfg = RewardsConfig(
        functions=[RewardSpec(path=f"{mod}:sleeps"), RewardSpec(name="arithmetic")], timeout_s=0.3, retries=0
    )
    # One thread slot: each stuck call must give it back at its timeout for the next call to run.
    with RewardScorer(cfg, max_threads=1) as scorer:
        scorer.score([make_sample("19")])  # the reward processes' first start, outside the time limit
        start = time.perf_counter()
        first = [make_sample("19"), make_sample("20")]
        values(scorer.score(first))
        second = [make_sample("19")]
        metrics = values(scorer.score(second))
        assert time.perf_counter() - start < 10.0
    assert [s.scores["arithmetic"] for s in first + second] == [1.0, 0.0, 1.0]
    assert metrics["reward/failed_timeout"] == 1.0


def test_sync_calls_share_a_few_threads_and_a_stuck_one_is_left_behind() -> None:
    """`BoundedCalls.bounded_each`: 40 sync calls run on at most `max_threads` threads (not one thread
    each), in order within a lane; a call past the timeout fails alone and the rest of its lane runs."""
    threads: set[threading.Thread] = set()  # the objects, kept alive: an ident can be reused

    def call(i: int) -> int:
        threads.add(threading.current_thread())
        if i == 1:
            time.sleep(30)
        if i == 2:
            raise ValueError("two")
        return i * 10

    calls = BoundedCalls(timeout_s=0.3, max_threads=2)
    try:
        start = time.perf_counter()
        out = calls.submit(calls.bounded_each([partial(call, i) for i in range(40)], "call"))
        assert time.perf_counter() - start < 5.0
    finally:
        calls.close()
    assert out[0] == (True, 0) and out[1] is None
    assert out[2] is not None and out[2][0] is False and isinstance(out[2][1], ValueError)
    assert out[3:] == [(True, i * 10) for i in range(3, 40)]
    assert len(threads) == 3  # two lanes, and a new thread for the lane whose call got stuck


def test_score_from_inside_a_running_event_loop() -> None:
    async def main(scorer: RewardScorer) -> dict[str, float]:
        return values(scorer.score([make_sample("19")]))

    with RewardScorer(RewardsConfig()) as scorer:
        assert asyncio.run(main(scorer))["reward/arithmetic"] == 1.0


def test_close_is_idempotent_and_stops_the_loop() -> None:
    scorer = RewardScorer(RewardsConfig())
    scorer.close()
    scorer.close()
    assert scorer.calls.closed
