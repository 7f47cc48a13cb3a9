"""Environment logic without a model: built-in envs, loading user envs, bounded env calls, and
reward functions written for TRL's GRPOTrainer."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import pytest

from tidal.config import ConfigError, EnvSpec, RewardsConfig, RewardSpec, load_config
from tidal.envs import Env, MultiTurnEnv, Step
from tidal.envs.builtins import CalculatorEnv, calculate, extract_code
from tidal.envs.loading import resolve_envs
from tidal.plugins import BoundedCalls
from tidal.rewards import RewardScorer
from tidal.telemetry.metrics import values
from tidal.types import Sample

pytestmark = pytest.mark.unit


def sample(text: str, row: dict[str, Any], gid: int = 0) -> Sample:
    return Sample(
        group_id=gid,
        prompt_ids=[1],
        response_ids=[2] * max(len(text), 1),
        loss_mask=[1] * max(len(text), 1),
        logp_mu=[-1.0] * max(len(text), 1),
        finish_reason="stop",
        version=0,
        versions=[0] * max(len(text), 1),
        text=text,
        row=row,
    )


# ----------------------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expr", "value"), [("12*34", 408), (" (7 - 9) * 3 ", -6), ("-5+2", -3), ("17 // 5", 3), ("17 % 5", 2), ("+4", 4)]
)
def test_calculate(expr: str, value: int) -> None:
    assert calculate(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('x')",
        "2**10",
        "a+1",
        "1/2",
        "3.5*2",
        "1//0",
        "[1]",
        "10**20",
        "999999999*999999999",
        "open('f')",
        "",
    ],
)
def test_calculate_rejects_anything_else(expr: str) -> None:
    with pytest.raises(ValueError):
        calculate(expr)


def test_calculator_env_turns() -> None:
    env = CalculatorEnv(max_turns=3, call_cost=0.1)
    state = env.reset({"prompt": "12*34=", "answer": "408"})
    step = env.step(state, "<calc>12*34</calc>")
    assert step == Step(observation="<result>408</result>") and state["calls"] == 1
    assert env.step(state, "<calc>12*</calc>").observation == "<result>error</result>"
    final = env.step(state, "408")
    assert final.done and final.reward == pytest.approx(1.0 - 0.2) and final.info == {"correct": 1.0, "calls": 2.0}
    wrong = env.step(env.reset({"answer": "408"}), " 407 ")
    assert wrong.done and wrong.reward == 0.0 and wrong.info["correct"] == 0.0
    with pytest.raises(ValueError, match="max_turns"):
        CalculatorEnv(max_turns=0)


def test_extract_code() -> None:
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("def f(): return 2") == "def f(): return 2"
    assert extract_code("```\nx = 1\n") == "x = 1\n"  # an unclosed fence still gives its code


# -------------------------------------------------------------------------------------------- loading

USER_ENVS = """
from tidal.envs import Env, MultiTurnEnv, Step

class Echo(Env):
    def __init__(self, bonus=0.0):
        self.bonus = bonus
    def score(self, sample, row):
        return 1.0 + self.bonus

class Chat(MultiTurnEnv):
    def step(self, state, text):
        return Step(done=True)

class NotAnEnv:
    pass
"""


def test_envs_resolve_by_name_and_path(tmp_path: Path) -> None:
    (tmp_path / "user_envs.py").write_text(USER_ENVS)
    envs = resolve_envs(
        [
            EnvSpec(name="arithmetic"),
            EnvSpec(path=f"{tmp_path}/user_envs.py:Echo", kwargs={"bonus": 0.5}),
            EnvSpec(path=f"{tmp_path}/user_envs.py:Chat", label="chat"),
        ]
    )
    assert list(envs) == ["arithmetic", "Echo", "chat"]
    assert envs["Echo"].score(sample("x", {}), {}) == 1.5
    assert isinstance(envs["chat"], MultiTurnEnv) and envs["chat"].max_turns == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "chess"}, "'chess' is not a built-in environment (known: arithmetic, calculator, code, math)"),
        ({"path": "{tmp}/user_envs.py:NotAnEnv"}, "'NotAnEnv' is not a tidal.envs.Env subclass"),
        ({"path": "{tmp}/user_envs.py:Missing"}, "has no attribute 'Missing' (it has: Chat, Echo, NotAnEnv)"),
        ({"path": "{tmp}/nope.py:Echo"}, "file {tmp}/nope.py not found"),
        ({"path": "{tmp}/user_envs.py:Echo", "kwargs": {"bonsu": 1}}, "building Echo with kwargs {'bonsu': 1} raised"),
        ({"name": "calculator", "kwargs": {"max_turns": 0}}, "max_turns must be >= 1"),
    ],
)
def test_env_mistakes_are_one_line_config_errors(tmp_path: Path, spec: dict[str, Any], message: str) -> None:
    (tmp_path / "user_envs.py").write_text(USER_ENVS)
    spec = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in spec.items()}
    with pytest.raises(ConfigError) as err:
        resolve_envs([EnvSpec(**spec)])
    assert message.replace("{tmp}", str(tmp_path)) in str(err.value) and "\n" not in str(err.value)


def test_env_labels_must_differ() -> None:
    with pytest.raises(ConfigError, match="envs\\[1\\]: label 'arithmetic' is taken"):
        resolve_envs([EnvSpec(name="arithmetic"), EnvSpec(name="arithmetic")])


def test_envs_config() -> None:
    cfg = load_config(None, ["envs=[{name: arithmetic, weight: 2}, {name: calculator, kwargs: {max_turns: 2}}]"])
    assert [e.name for e in cfg.envs] == ["arithmetic", "calculator"] and cfg.envs[0].weight == 2
    with pytest.raises(ConfigError, match="exactly one of `name`"):
        load_config(None, ["envs=[{weight: 2}]"])
    with pytest.raises(ConfigError, match="rewards.functions scores the run's `data`, which `envs` replaces"):
        load_config(None, ["envs=[{name: arithmetic}]", "rewards.functions=[{name: exact_match}]"])
    with pytest.raises(ConfigError, match="unknown config key 'envs\\[0\\].wieght'"):
        load_config(None, ["envs=[{name: arithmetic, wieght: 2}]"])


# ------------------------------------------------------------------------------------- bounded calls


def test_run_calls_contains_failures() -> None:
    async def slow_async() -> int:
        await asyncio.sleep(5)
        return 1

    async def fine_async() -> int:
        return 7

    def boom() -> None:
        raise KeyError("nope")

    calls = BoundedCalls(timeout_s=0.3)
    t0 = time.perf_counter()
    out = calls.run([lambda: 3, boom, lambda: time.sleep(5), slow_async, fine_async])
    assert time.perf_counter() - t0 < 2.0  # bounded by the timeout, not by the 5 s calls
    calls.close()
    assert (out[0].ok, out[0].value) == (True, 3)
    assert not out[1].ok and out[1].reason == "raised KeyError: 'nope'"
    assert not out[2].ok and out[2].reason == "timed out after 0.3s"
    assert not out[3].ok and out[3].reason == "timed out after 0.3s"
    assert (out[4].ok, out[4].value) == (True, 7)


# -------------------------------------------------------------------------------------- TRL rewards

TRL_REWARDS = '''
def length_penalty(prompts, completions, **kwargs):
    """Written for TRL's GRPOTrainer: columns arrive as lists."""
    return [-len(c) / 10 if kind != "skip" else None for c, kind in zip(completions, kwargs["kind"])]

def bad_length(prompts, completions, **kwargs):
    return [1.0]

def crashes(prompts, completions, **kwargs):
    raise RuntimeError("judge down")

def nan_for_b(prompts, completions, answer, **kwargs):
    return [float("nan") if a == "b" else 1.0 for a in answer]
'''


def test_trl_style_rewards_score_the_whole_batch(tmp_path: Path) -> None:
    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS)
    specs = [
        RewardSpec(path=f"{tmp_path}/trl_rewards.py:{name}")
        for name in ("length_penalty", "bad_length", "crashes", "nan_for_b")
    ]
    rows = [{"prompt": "p1", "answer": "a", "kind": "x"}, {"prompt": "p2", "answer": "b", "kind": "skip"}]
    samples = [sample("abcd", rows[0]), sample("ab", rows[1], gid=1)]
    with RewardScorer(RewardsConfig(functions=specs, failure_reward=-1.0)) as scorer:
        metrics = values(scorer.score(samples))
    a, b = samples
    assert a.scores["length_penalty"] == pytest.approx(-0.4)
    assert b.scores["length_penalty"] == 0.0  # None: the function does not apply to this sample
    assert a.scores["bad_length"] == b.scores["bad_length"] == -1.0  # one score for two samples
    assert a.scores["crashes"] == -1.0 and a.scores["nan_for_b"] == 1.0 and b.scores["nan_for_b"] == -1.0
    assert any("bad_length: returned 1 scores, expected a list of 2 scores" in e for e in a.reward_errors)
    assert any("crashes: raised RuntimeError: judge down" in e for e in b.reward_errors)
    assert metrics["reward/failed_type"] == 2 and metrics["reward/failed_exception"] == 2
    assert metrics["reward/failed_nan"] == 1
    assert a.reward == pytest.approx(-0.4 - 1 - 1 + 1) and math.isfinite(b.reward)


# ------------------------------------------------------------------------------------------ protocol


def test_env_defaults() -> None:
    class Plain(Env):
        def score(self, sample: Sample, row: dict[str, Any]) -> float:
            return 0.0

    s = sample("7", {"prompt": "3+4="})
    assert Plain().prompt({"prompt": "3+4="}) == "3+4="
    s.reward = 0.5
    assert Plain().is_correct(s, s.row)
    with pytest.raises(NotImplementedError, match="must define score"):
        Env().score(s, s.row)

    class Turns(MultiTurnEnv):
        pass

    s.step_rewards = [0.25, 0.5]
    assert Turns().score(s, s.row) == 0.75 and Turns().reset({}) is None


def test_math_env() -> None:
    from tidal.envs.builtins import MathEnv

    env = MathEnv(instruction=" Put the answer in \\boxed{}.")
    row = {"prompt": "What is 1/2 + 0?", "answer": "0.5"}
    assert env.prompt(row) == "What is 1/2 + 0? Put the answer in \\boxed{}."
    assert env.score(sample("so \\boxed{\\frac{1}{2}}", row), row) == 1.0
    assert env.score(sample("\\boxed{3}", row), row) == 0.0
    assert env.score(sample("no idea", row), row) == 0.0
