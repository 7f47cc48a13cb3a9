"""A `verifiers` environment as a tidal env (`envs: [{verifiers: ...}]`): the example's ToolEnv runs
in its runner process against a real rollout worker's endpoint, its rubric's reward becomes the
episodes' reward, and every model call is recorded token for token as for any agent. Needs verifiers
0.3 (`scripts/setup.sh --verifiers`, which the test command runs); skipped without it."""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tidal.config import ConfigError, RunConfig, load_config
from tidal.envs.loading import resolve_envs
from tidal.envs.verifiers_env import VerifiersAgent, runner_env
from tidal.model.forward import completion_logprobs
from tidal.model.loading import build_char_tokenizer
from tidal.rollout.worker import RolloutWorker, WorkerConfig
from tidal.stages.check import load_env_splits
from tidal.telemetry.metrics import values
from tidal.types import Prompt

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples/verifiers/calculator_env.py"

_found = subprocess.run([sys.executable, "-c", "import verifiers"], env=runner_env(), capture_output=True)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_found.returncode != 0, reason="verifiers is not installed (scripts/setup.sh --verifiers)"),
]

BROKEN = """
import sys

import verifiers as vf
from datasets import Dataset


def boom(completion, **kwargs):
    raise KeyError("score")


def load_environment(fail_in="rows"):
    if sys.argv[1] == fail_in:  # the runner's mode: `rows` (start-up) or `serve` (the worker's runner)
        raise ValueError("no such split")
    rubric = vf.Rubric(funcs=[boom]) if fail_in == "rubric" else vf.Rubric()
    return vf.SingleTurnEnv(dataset=Dataset.from_list([{"question": "1+1=", "answer": "2"}]), rubric=rubric)
"""


def config(envs: str, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            "model.preset=tiny-qwen3-moe",
            "rollout.group_size=2",
            "rollout.max_new_tokens=12",
            "rollout.max_context_tokens=1000",
            "rollout.temperature=1.0",
            "monitor.wandb=disabled",
            f"envs={envs}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vf") / "broken_env.py"
    path.write_text(BROKEN)
    return path


def test_verifiers_envs_on_a_worker(preset: Path, broken: Path) -> None:
    """The example's ToolEnv through a real worker's endpoint, beside an environment whose runner
    fails to start and one whose rubric raises, in one rollout."""
    envs = (
        f"[{{verifiers: '{EXAMPLE}', label: vf, kwargs: {{num_train: 6, num_eval: 3, max_turns: 2}}}}, "
        f"{{verifiers: '{broken}', label: start, kwargs: {{fail_in: serve}}}}, "
        f"{{verifiers: '{broken}', label: rubric, kwargs: {{fail_in: rubric}}}}]"
    )
    cfg = config(envs)
    # Its prompts are its own dataset, train and held-out, read through the runner.
    sources, held_out, _ = load_env_splits(cfg, build_char_tokenizer())
    train = sources["vf"][0].to_list()
    assert len(train) == 6 and len([p for p in held_out if p.env == "vf"]) == 3
    assert train[0]["prompt"].endswith("=") and train[0]["split"] == "train" and train[0]["example_id"] == 0
    assert {p.row["split"] for p in held_out if p.env == "vf"} == {"eval"}

    worker = RolloutWorker(WorkerConfig.of(cfg), str(preset))
    row = {"prompt": "1+1=", "example_id": 0, "split": "train"}
    prompts = [
        Prompt(0, train[0], "vf"),
        Prompt(1, held_out[1].row, "vf"),
        Prompt(2, row, "start"),
        Prompt(3, row, "rubric"),
    ]
    result = worker.rollout(prompts, seed=0)
    by_group = {g.group_id: g.samples for g in result.groups}
    samples, metrics = by_group[0] + by_group[1], values(result.metrics)
    assert [(s.group_id, s.episode_end) for s in samples if s.episode_end] == [(0, True)] * 2 + [(1, True)] * 2
    for s in samples:
        assert s.reward_errors == [], s.reward_errors
        # The rubric's reward (0/1 for a random model's answer) and its function's score as a sub-score.
        assert s.reward in (0.0, 1.0) and s.scores.get("vf/correct") == s.reward, s.scores
        assert 1 <= s.turns <= 2
        (forward,) = completion_logprobs(worker.engine.model, [s.prompt_ids], [s.response_ids], 0, 1.0)
        trained = torch.tensor(s.loss_mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(s.logp_mu)[trained], forward[trained], atol=1e-4, rtol=0)
    # verifiers' ToolEnv offered its tool: the prompt the model saw names it (the template renders tools).
    tok = worker.engine.tokenizer
    assert '"calc"' in tok.decode(samples[0].prompt_ids) and "12+30" in tok.decode(samples[0].prompt_ids)
    assert metrics["env/vf/agent_failed"] == 0 and metrics["env/vf/samples"] == len(samples)

    # A runner that fails to start, and a rubric that raises (verifiers logs that and scores 0.0):
    # every episode is recorded as failed, with why, and the rollout goes on.
    assert all(len(by_group[g]) == 2 and all(s.failed for s in by_group[g]) for g in (2, 3))
    assert all("start() raised RunnerFailed" in s.reward_errors[0] for s in by_group[2]), by_group[2][0].reward_errors
    assert all("no such split" in s.reward_errors[0] for s in by_group[2])
    assert all("the rubric's boom raised KeyError" in s.reward_errors[0] for s in by_group[3])
    assert metrics["env/start/agent_failed"] == metrics["env/rubric/agent_failed"] == 1.0
    assert worker.agents is not None and worker.agents.endpoint.sessions == {}


def test_verifiers_config_errors_are_one_line(broken: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"envs\[0\].verifiers .*cannot load the environment: ValueError: no such split"
    ):
        load_env_splits(config(f"[{{verifiers: '{broken}'}}]"), build_char_tokenizer())
    with pytest.raises(ConfigError, match="no file"):
        load_env_splits(config(f"[{{verifiers: '{tmp_path / 'missing.py'}'}}]"), build_char_tokenizer())
    with pytest.raises(Exception, match="brings its own dataset"):
        config(f"[{{verifiers: '{EXAMPLE}', data: {{source: {{type: arithmetic}}}}}}]")
    with pytest.raises(ConfigError, match="as JSON"):
        VerifiersAgent(str(EXAMPLE), {"when": datetime.date(2026, 12, 7)}, "envs[0]")
    assert list(resolve_envs(config(f"[{{verifiers: '{EXAMPLE}'}}]").envs)) == ["calculator_env"]


# ------------------------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_the_example_runs_through_ray_workers(example_run: Callable[..., tuple[list[dict], dict]]) -> None:
    """The example's YAML, a few steps on the random-init preset: the environment's rollouts flow
    from the workers' runners and endpoints through the buffer to the trainer. (Slow tier: the
    per-commit tier runs agents through Ray workers with examples/agent, and verifiers on a worker.)"""
    rows, summary = example_run(
        "examples/verifiers/config.yaml",
        "model.sft_warm_start=null",
        "model.preset=tiny-qwen3-moe",
        "train.steps=2",
        "train.eval_every=0",
        "eval.num_samples=4",
        "rollout.prompts_per_step=4",
        "filter.zero_variance=false",
        "monitor.wandb=disabled",
    )
    steps = [r for r in rows if "env/arith/samples" in r]
    assert [r["step"] for r in rows if "train/version" in r] == [1, 2]
    assert sum(r["env/arith/samples"] for r in steps) >= 2 * 4 * 8
    # Every episode called the model once; verifiers fails the few whose answer the random-init
    # model left empty (EmptyModelResponseError), and tidal records them.
    assert all(r["env/arith/agent_model_calls"] == 1 and r["env/arith/agent_failed"] < 0.25 for r in steps), str(steps)
    assert summary["ledger/unique_trained_groups"] == summary["ledger/taken_groups"] == 8


@pytest.mark.slow
def test_the_example_learns(example_run: Callable[..., tuple[list[dict], dict]]) -> None:
    """The example as the README runs it: from the quickstart's warm start, the reward of the
    environment's rubric rises, and held-out accuracy with it."""
    rows, summary = example_run("examples/verifiers/config.yaml", "monitor.wandb=disabled")
    reward = [r["env/arith/reward"] for r in rows if "env/arith/reward" in r]
    first, last = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    # Measured 2026-12-07: reward 0.314 -> 0.437 (first and last 10 steps), held-out 34.0% -> 45.5%.
    assert last > first + 0.08, reward
    assert summary["eval/accuracy"] > summary["eval/accuracy_before"] + 0.06, summary
