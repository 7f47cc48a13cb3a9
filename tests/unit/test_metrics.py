"""Metrics merge by the reduction each one declares: counts add up, means weigh by what they average
over, extremes stay extremes. Two workers' rows, merged, equal the row of all their samples at once."""

from __future__ import annotations

import pytest
import torch

from tidal.config import EnvSpec, RewardsConfig
from tidal.metrics import largest, mean, merge, smallest, spread, total, values
from tidal.rollout.env_runtime import build_runtimes, score_samples
from tidal.trainer.losses import router_aux_loss
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


def sample(text: str, answer: str, env: str, versions: list[int] | None = None) -> Sample:
    n = len(text)
    return Sample(group_id=0, prompt_ids=[1], response_ids=[5] * n, loss_mask=[1] * n, logp_mu=[-1.0] * n,
                  finish_reason="stop", version=0, versions=versions or [0] * n, text=text,
                  row={"prompt": "1+1=", "answer": answer}, env=env)  # fmt: skip


def test_two_workers_merge_to_the_metrics_of_all_their_samples() -> None:
    envs = [EnvSpec(name="arithmetic"), EnvSpec(name="calculator", label="calc")]
    runtimes = build_runtimes(envs, RewardsConfig(), data=None)  # type: ignore[arg-type]
    calc_info = {"correct": 1.0, "calls": 0.0}
    # Worker 1: 3 arithmetic samples (2 right), 1 calculator episode; worker 2: 1 arithmetic (right), 3 calc.
    one = [sample("2", "2", "arithmetic"), sample("2", "2", "arithmetic"), sample("3", "2", "arithmetic"),
           sample("4", "4", "calc")]  # fmt: skip
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
    rows = [router_aux_loss((r,), 2, 1, None)[1] for r in (even, skewed)]
    m = values(merge(rows))
    assert m["moe/expert_load_min"] == 0.0 and m["moe/expert_load_max"] == 2.0  # a mean would say 0.5 and 1.5
    assert m["moe/aux_loss"] == pytest.approx((values(rows[0])["moe/aux_loss"] + values(rows[1])["moe/aux_loss"]) / 2)
