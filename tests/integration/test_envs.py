"""Environments with a real tiny MoE: multi-turn samples (observation tokens masked, the model's own
tokens keeping their behavior log-probs), the context limit (each episode's own), hostile envs
contained, a run mixing two envs with per-env data and metrics, and the user-written example env
learning."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tidal.config import RunConfig, load_config
from tidal.model.forward import completion_logprobs
from tidal.model.loading import load_tokenizer
from tidal.rollout.worker import RolloutWorker, WorkerConfig
from tidal.telemetry.metrics import values
from tidal.types import Prompt, Sample

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPTED = '''
import math, time
from tidal.envs import Env, MultiTurnEnv, Step

class Scripted(MultiTurnEnv):
    """Three model turns; after the first two the env answers `<r>1</r>`, `<r>2</r>`."""
    def __init__(self):
        self.max_turns = 3
    def reset(self, row):
        return {"turn": 0}
    def step(self, state, text):
        state["turn"] += 1
        if state["turn"] < 3:
            return Step(observation=f"<r>{state['turn']}</r>", reward=0.25)
        return Step(reward=1.0, done=True, info={"n": 3.0})

class Recorder(MultiTurnEnv):
    """Two model turns with an observation between; keeps the text of every turn it is given."""
    def __init__(self):
        self.max_turns = 2
        self.seen = {}
    def reset(self, row):
        return {"prompt": row["prompt"], "turn": 0}
    def step(self, state, text):
        state["turn"] += 1
        self.seen[state["prompt"], state["turn"]] = text
        return Step(observation="<r>ok</r>", done=state["turn"] == 2)

class Hostile(MultiTurnEnv):
    """Fails differently per group: raises, hangs, wrong type; group 3 is fine but scores NaN."""
    def reset(self, row):
        return int(row["kind"])
    def step(self, kind, text):
        if kind == 0:
            raise RuntimeError("env exploded")
        if kind == 1:
            time.sleep(30)
        if kind == 2:
            return "not a step"
        return Step(reward=1.0, done=True)
    def score(self, sample, row):
        return math.nan if int(row["kind"]) == 3 else sum(sample.step_rewards)
'''


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("envs") / "user_envs.py"
    path.write_text(SCRIPTED)
    return path


def config(env: str, *extra: str, isolation: str = "thread") -> RunConfig:
    return load_config(
        None,
        [
            "model.preset=tiny-qwen3-moe",
            "rollout.group_size=3",
            "rollout.max_new_tokens=5",
            "rollout.temperature=1.0",
            "monitor.wandb=disabled",
            f"envs=[{{path: '{env}', label: scripted, isolation: {isolation}}}]",
            *extra,
        ],
    )


def segments(mask: list[int]) -> list[tuple[int, int]]:
    """(value, length) runs of a 0/1 mask."""
    out: list[tuple[int, int]] = []
    for m in mask:
        out = out[:-1] + [(m, out[-1][1] + 1)] if out and out[-1][0] == m else [*out, (m, 1)]
    return out


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_multi_turn_samples_mask_observations_and_keep_behavior_logprobs(
    preset: Path, env_file: Path, isolation: str
) -> None:
    """In a process the env's `step` changes a copy of the state: it comes back, or every turn would
    be the first."""
    worker = RolloutWorker(WorkerConfig.of(config(f"{env_file}:Scripted", isolation=isolation)), str(preset))
    tok = load_tokenizer(preset)
    prompts = [
        Prompt(0, {"prompt": "12+7=", "answer": "19"}, "scripted"),
        Prompt(1, {"prompt": "5-3=", "answer": "2"}, "scripted"),
    ]
    result = worker.rollout(prompts, seed=0)
    samples, metrics = [s for g in result.groups for s in g.samples], values(result.metrics)
    assert len(samples) == 6
    obs = [tok(f"<r>{i}</r>", add_special_tokens=False)["input_ids"] for i in (1, 2)]
    for s in samples:
        assert s.turns == 3 and s.step_rewards == [0.25, 0.25, 1.0] and s.reward == 1.5
        assert s.env == "scripted" and s.env_info == {"n": 3.0} and s.reward_errors == []
        runs = segments(s.loss_mask)
        assert [v for v, _ in runs] == [1, 0, 1, 0, 1]  # model, observation, model, observation, model
        starts = [sum(n for _, n in runs[:i]) for i in range(len(runs))]
        for (v, n), start, k in zip(runs[1::2], starts[1::2], (0, 1), strict=True):
            assert v == 0 and s.response_ids[start : start + n] == obs[k]
            assert s.logp_mu[start : start + n] == [0.0] * n
        # The model's tokens keep the log-probs they were sampled with: equal to a teacher-forced
        # forward over the whole conversation, observations included, with the same weights.
        (recomputed,) = completion_logprobs(worker.engine.model, [s.prompt_ids], [s.response_ids], 0, 1.0)
        model = [i for i, m in enumerate(s.loss_mask) if m]
        assert max(abs(s.logp_mu[i] - float(recomputed[i])) for i in model) < 1e-4
        assert s.text == tok.decode(s.response_ids, skip_special_tokens=True) and "<r>1</r>" in s.text
    assert metrics["env/scripted/turns_mean"] == 3.0 and metrics["env/scripted/n"] == 3.0
    assert metrics["env/scripted/reward"] == 1.5 and metrics["reward/mean"] == 1.5
    assert metrics["perf/rollout_tokens"] == sum(sum(s.loss_mask) for s in samples)  # model tokens only


def test_context_limit_ends_an_episode(preset: Path, env_file: Path) -> None:
    cfg = config(f"{env_file}:Scripted", "rollout.max_context_tokens=14")
    worker = RolloutWorker(WorkerConfig.of(cfg), str(preset))
    (group,) = worker.rollout([Prompt(0, {"prompt": "12+7=", "answer": "19"}, "scripted")], seed=1).groups
    for s in group.samples:
        assert len(s.prompt_ids) + len(s.response_ids) <= 14
        assert s.finish_reason == "length" and s.turns < 3


def test_each_episode_gets_its_own_context_room(preset: Path, env_file: Path) -> None:
    """Episodes batched with one near `max_context_tokens`: the long one's turn is cut to its own
    room, the others' turns are exactly what they are without it (greedy decoding is
    batch-invariant), down to the text `step` receives."""
    limit, room = 64, 4
    cfg = config(
        f"{env_file}:Recorder",
        "rollout.group_size=1",
        "rollout.temperature=0",
        "rollout.max_new_tokens=12",
        f"rollout.max_context_tokens={limit}",
    )
    worker = RolloutWorker(WorkerConfig.of(cfg), str(preset))
    env = worker.envs["scripted"].env
    short = [Prompt(i, {"prompt": p, "answer": ""}, "scripted") for i, p in enumerate(["12+7=", "5-3=", "hello"])]
    long = Prompt(3, {"prompt": "0123456789" * 6, "answer": ""}, "scripted")  # 60 tokens: room for 4

    alone = {g.group_id: g.samples[0] for g in worker.rollout(short, seed=0).groups}
    alone_texts, env.seen = env.seen, {}
    mixed = {g.group_id: g.samples[0] for g in worker.rollout([*short, long], seed=0).groups}

    for p in short:
        a, m = alone[p.group_id], mixed[p.group_id]
        assert segments(a.loss_mask)[0][1] > room  # a turn the long episode's room would have cut
        assert (m.response_ids, m.loss_mask, m.finish_reason) == (a.response_ids, a.loss_mask, a.finish_reason)
        assert m.turns == 2
        for turn in (1, 2):
            key = (p.row["prompt"], turn)
            assert env.seen[key] == alone_texts[key]
    s = mixed[long.group_id]
    assert len(s.prompt_ids) == limit - room
    assert segments(s.loss_mask) == [(1, room)]  # its turn fills the context; no room for the observation
    assert s.finish_reason == "length" and len(s.prompt_ids) + len(s.response_ids) == limit
    assert env.seen[long.row["prompt"], 1] == worker.engine.tokenizer.decode(s.response_ids, skip_special_tokens=True)


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_hostile_env_is_contained(preset: Path, env_file: Path, isolation: str) -> None:
    """A thread that sleeps past the timeout is abandoned; a process is killed. The same record."""
    cfg = config(f"{env_file}:Hostile", "rewards.timeout_s=0.5", "rewards.failure_reward=-1", isolation=isolation)
    worker = RolloutWorker(WorkerConfig.of(cfg), str(preset))
    prompts = [Prompt(k, {"prompt": "1+1=", "answer": "2", "kind": str(k)}, "scripted") for k in range(4)]
    result = worker.rollout(prompts, seed=0)
    by_kind: dict[int, list[Sample]] = {g.group_id: g.samples for g in result.groups}
    metrics = values(result.metrics)
    assert all(len(v) == 3 for v in by_kind.values())  # no sample lost
    errors = {k: {":".join(e.split(":")[:2]) for s in v for e in s.reward_errors} for k, v in by_kind.items()}
    assert errors[0] == {"step: raised RuntimeError"}
    assert errors[1] == {"step: timed out after 0.5s"}
    assert errors[2] == {"step: returned str, expected a tidal.envs.Step"}
    assert all(s.reward == -1.0 for s in by_kind[3])  # NaN score: the failure reward, recorded
    assert all(any("returned NaN" in e for e in s.reward_errors) for s in by_kind[3])
    assert metrics["env/scripted/failed_samples"] == 12 and metrics["reward/failed_nan"] == 3
    assert all(math.isfinite(s.reward) for v in by_kind.values() for s in v)


# ------------------------------------------------------------------------------------------- runs


def test_a_run_mixing_two_envs(preset: Path, tmp_path: Path) -> None:
    from tidal.stages.train import run_train

    calc_rows = [{"prompt": f"{a}*{b}=", "answer": str(a * b)} for a in range(11, 30) for b in range(3, 7)]
    (tmp_path / "calc.jsonl").write_text("\n".join(json.dumps(r) for r in calc_rows))
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'runs'}",
            "name=mixed",
            "model.preset=tiny-qwen3-moe",
            "data.source.ops=[+]",
            "data.source.eval_size=6",
            "envs=[{name: arithmetic, weight: 3.0},"
            f" {{name: calculator, label: calc, weight: 1.0, kwargs: {{max_turns: 2}},"
            f"   data: {{source: {{type: files, train_files: ['{tmp_path / 'calc.jsonl'}'],"
            f"                    eval_files: ['{tmp_path / 'calc.jsonl'}']}}}}}}]",
            "rollout.group_size=4",
            "rollout.prompts_per_step=8",
            "rollout.max_new_tokens=4",
            "rollout.max_staleness=1",
            "filter.zero_variance=false",
            "train.steps=3",
            "train.eval_every=0",
            "eval.num_samples=10",
            "eval.max_new_tokens=4",
            "monitor.wandb=disabled",
            "train.save_checkpoint=false",
        ],
    )
    summary = run_train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    samples = {env: sum(r.get(f"env/{env}/samples", 0) for r in steps) for env in ("arithmetic", "calc")}
    assert samples["arithmetic"] + samples["calc"] == 3 * 8 * 4
    assert samples["arithmetic"] > samples["calc"] > 0  # drawn 3 : 1
    assert all(r["env/calc/turns_mean"] >= 1 for r in steps if "env/calc/turns_mean" in r)
    assert summary["ledger/unique_trained_groups"] == summary["ledger/taken_groups"] == 24
    final = rows[-1]
    assert {"eval/arithmetic/accuracy", "eval/calc/accuracy", "eval/accuracy"} <= set(summary) | set(final)


def example_env_run(
    tmp_path: Path, *overrides: str
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], dict[str, Any]]:
    """`tidal train examples/custom_env/config.yaml` from the repository root, as the README says, on a
    machine where matplotlib has no font cache yet."""
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "matplotlib")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidal.cli",
            "train",
            "examples/custom_env/config.yaml",
            "train.eval_every=0",
            f"output_dir={tmp_path / 'runs'}",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs/custom-env/metrics.jsonl").read_text().splitlines()]
    return proc, rows, json.loads((tmp_path / "runs/custom-env/summary.json").read_text())


def test_user_example_env_runs_from_its_yaml_and_the_terminal_shows_tidals_lines(tmp_path: Path) -> None:
    """The example's YAML as a user runs it, a few steps from the random-init preset (the warm start
    and the learning are the slow tier's): its env's data, rewards and metrics flow through a run. What
    the terminal shows is tidal's: not Ray's warning about actor constructor arguments in the object
    store (workers are restartable), nor matplotlib's notice that it built its font cache (a run does
    not import matplotlib: the wandb charts at its end read the rows without it)."""
    proc, rows, summary = example_env_run(
        tmp_path,
        "train.steps=3",
        "model.sft_warm_start=null",
        "model.preset=tiny-qwen3-moe",
        "rollout.prompts_per_step=8",
    )
    assert [r["step"] for r in rows if "train/version" in r] == [1, 2, 3]
    assert any("env/double/reward" in r for r in rows)
    assert summary["eval/num_samples"] == 20 and {"eval/double/accuracy", "eval/double/accuracy_before"} <= set(summary)
    terminal = proc.stdout + proc.stderr
    assert "train done in" in proc.stdout and "[step 3/3]" in proc.stdout, terminal
    assert "core_worker.cc" not in terminal and "font_manager" not in terminal, terminal
    # The memory plan's totals, logged as the run starts (`tidal plan` shows the parts).
    assert "memory plan: " in terminal and " per trainer rank, " in terminal, terminal


@pytest.mark.slow
def test_user_example_env_trains_and_its_reward_rises(tmp_path: Path) -> None:
    """The example as the README runs it (fewer steps; the SFT warm start is trained on first use)."""
    steps = 30
    _, rows, summary = example_env_run(tmp_path, f"train.steps={steps}", "monitor.wandb=disabled")
    # Rollout metrics are logged with the groups that arrived since the last step (streaming): most
    # steps, not necessarily every one.
    reward = [r["env/double/reward"] for r in rows if "env/double/reward" in r]
    assert len(reward) >= steps // 2
    first, last = sum(reward[:8]) / 8, sum(reward[-8:]) / 8
    assert last > first + 0.05, reward
    assert summary["eval/double/accuracy"] >= summary["eval/double/accuracy_before"]


def test_code_env_scores_solutions_in_the_sandbox(tmp_path: Path) -> None:
    from tidal.envs.builtins import CodeEnv

    env = CodeEnv(timeout_s=2.0)
    tests = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4"
    row = {"prompt": "Write add(a, b).", "tests": tests}

    def score(text: str) -> tuple[float, dict[str, float]]:
        s = Sample(0, [1], [2], [1], [-1.0], "stop", 0, [0], text=text, row=row)
        r = env.score(s, row)
        return r.score, r.sub_scores

    assert score("```python\ndef add(a, b):\n    return a + b\n```") == (1.0, {"passed": 3.0, "timed_out": 0.0})
    partial, subs = score("def add(a, b):\n    return 3")
    assert partial == pytest.approx(1 / 3) and subs == {"passed": 1.0, "timed_out": 0.0}
    assert score("def add(a, b) return") == (0.0, {"passed": 0.0, "timed_out": 0.0})
    # Hostile code is contained: a file outside the sandbox stays untouched, a loop is cut at the timeout.
    victim = tmp_path / "metrics.jsonl"
    victim.write_text("precious\n")
    hostile = f"open({str(victim)!r}, 'w').write('gone')\ndef add(a, b):\n    return a + b"
    assert score(hostile)[0] == 0.0 and victim.read_text() == "precious\n"
    assert score("while True:\n    pass")[1]["timed_out"] == 1.0
