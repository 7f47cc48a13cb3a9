"""Metrics merge by the reduction each one declares: counts add up, means weigh by what they average
over, extremes stay extremes. Two workers' rows, merged, equal the row of all their samples at once."""

from __future__ import annotations

import pytest
import torch

from tidal.config import EnvSpec, RewardsConfig
from tidal.driver.loop import _perf
from tidal.rollout.env_runtime import build_runtimes, score_samples
from tidal.rollout.worker import generate_timing
from tidal.telemetry.metrics import Metrics, largest, mean, merge, smallest, spread, total, values
from tidal.trainer.losses import expert_load_stats, switch_aux_loss
from tidal.types import Sample

pytestmark = pytest.mark.unit


def test_each_reduction() -> None:
    a = {"n": total(3.0), "acc": mean(1.0, 30.0), "hi": largest(2.0), "lo": smallest(0.5), "sd": spread(1.0, 0.0, 2)}
    b = {"n": total(2.0), "acc": mean(0.0, 10.0), "hi": largest(5.0), "lo": smallest(0.7), "sd": spread(1.0, 2.0, 2)}
    m = values(merge([a, b]))
    # sd: items {-1, 1} and {1, 3}: mean 1, population variance (4 + 0 + 0 + 4) / 4 = 2.
    assert m == {"n": 5.0, "acc": 0.75, "hi": 5.0, "lo": 0.5, "sd": pytest.approx(2**0.5)}
    assert values(merge([a, {"only_here": total(1.0)}]))["only_here"] == 1.0  # a key one row lacks
    with pytest.raises(ValueError, match="several reductions"):
        merge([{"x": total(1.0)}, {"x": mean(1.0)}])


def generate_call(start: float, seconds: float, tokens: float) -> Metrics:
    """The timing and token count a rollout worker reports for one generate call."""
    return {**generate_timing(start, seconds), "perf/rollout_tokens": total(tokens)}


def tokens_per_s(rows: list[Metrics]) -> float:
    return _perf(values(merge(rows)), (0.0,) * 6)["perf/rollout_tokens_per_s"]


def test_rollout_tokens_per_s_of_one_worker_counts_all_its_generate_calls() -> None:
    """Two calls one after the other, 100 tokens in 2 s each: 50 tokens/s, not 200 tokens over the
    longer call's 2 s."""
    assert tokens_per_s([generate_call(10.0, 2.0, 100.0), generate_call(12.5, 2.0, 100.0)]) == 50.0


def test_rollout_tokens_per_s_of_a_fleet_is_over_the_time_any_worker_generated() -> None:
    """Worker 0 generates from 0 to 2 s and from 3 to 5 s, worker 1 beside it from 1 to 4 s, 100
    tokens per call: the fleet made 300 tokens in the 5 s during which a worker was generating."""
    calls = [generate_call(0.0, 2.0, 100.0), generate_call(3.0, 2.0, 100.0), generate_call(1.0, 3.0, 100.0)]
    assert values(merge(calls))["perf/generate_time_s"] == 5.0
    assert tokens_per_s(calls) == 60.0
    # The buffer merges the rows it got, the driver merges that with more: the same 5 s.
    assert values(merge([merge(calls[:1]), merge(calls[1:])]))["perf/generate_time_s"] == 5.0


def sample(text: str, answer: str, env: str, versions: list[int] | None = None) -> Sample:
    n = len(text)
    return Sample(
        group_id=0,
        prompt_ids=[1],
        response_ids=[5] * n,
        loss_mask=[1] * n,
        logp_mu=[-1.0] * n,
        finish_reason="stop",
        version=0,
        versions=versions or [0] * n,
        text=text,
        row={"prompt": "1+1=", "answer": answer},
        env=env,
    )


def test_two_workers_merge_to_the_metrics_of_all_their_samples() -> None:
    envs = [EnvSpec(name="arithmetic"), EnvSpec(name="calculator", label="calc")]
    runtimes = build_runtimes(envs, RewardsConfig(), data=None)  # type: ignore[arg-type]
    calc_info = {"correct": 1.0, "calls": 0.0}
    # Worker 1: 3 arithmetic samples (2 right), 1 calculator episode; worker 2: 1 arithmetic (right), 3 calc.
    one = [
        sample("2", "2", "arithmetic"),
        sample("2", "2", "arithmetic"),
        sample("3", "2", "arithmetic"),
        sample("4", "4", "calc"),
    ]
    two = [sample("7", "7", "arithmetic"), sample("5", "5", "calc"), sample("6", "5", "calc"), sample("9", "8", "calc")]
    for s in [*one, *two]:
        if s.env == "calc":
            right = s.text == s.row["answer"]
            s.step_rewards, s.env_info = [float(right)], {**calc_info, "correct": float(right)}
    rows = [score_samples(runtimes, one), score_samples(runtimes, two)]
    merged = values(merge(rows))
    for s in [*one, *two]:
        s.reward_errors = []  # scored again below, from scratch
    whole = values(score_samples(runtimes, [*one, *two]))
    assert merged.keys() == whole.keys()
    for k in whole:
        if k != "reward/score_time_s":  # the slowest worker's, against the sum when scored at once
            assert merged[k] == pytest.approx(whole[k], abs=1e-12), k
    # Counts add up (they were averaged by name before), rates weigh by samples.
    assert merged["env/arithmetic/samples"] == 4.0 and merged["env/calc/samples"] == 4.0
    assert merged["env/arithmetic/accuracy"] == 0.75 and merged["env/calc/accuracy"] == 0.5
    assert merged["rollout/accuracy"] == pytest.approx(5 / 8) and merged["reward/failed"] == 0.0
    for rt in runtimes.values():
        rt.scorer.close()


def test_expert_load_min_is_a_min_over_micro_batches() -> None:
    # Two micro-batches: the first routes evenly, the second sends every token to expert 0.
    even = torch.tensor([[5.0, 0.0], [0.0, 5.0]])  # (rows, E): top-1 alternates
    skewed = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    rows = [
        {**switch_aux_loss((r,), picked, None)[1], **expert_load_stats(picked, None, 2)}
        for r, picked in ((even, torch.tensor([[[0]], [[1]]])), (skewed, torch.tensor([[[0]], [[0]]])))
    ]
    m = values(merge(rows))
    assert m["moe/expert_load_min"] == 0.0 and m["moe/expert_load_max"] == 2.0  # a mean would say 0.5 and 1.5
    assert m["moe/aux_loss"] == pytest.approx((values(rows[0])["moe/aux_loss"] + values(rows[1])["moe/aux_loss"]) / 2)
