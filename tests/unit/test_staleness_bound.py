"""The adaptive staleness bound: the measured M2 per version, the bound it implies, the controller's
running estimate, its config, and the driver's dispatch rule under a bound that moves."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tidal.config import AdaptiveStaleness, ConfigError, load_config
from tidal.driver.dispatch import may_dispatch
from tidal.driver.staleness import SMOOTHING, StalenessBound, bound_for
from tidal.trainer.offpolicy import offpolicy_stats

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------ M2 per version


def test_m2_per_version_is_m2_over_the_mean_squared_age() -> None:
    # log(pi_old / mu) = [0.2, -0.4 | 0.6, pad] with ages [1, 1 | 2, 2]: sum of squares 0.04 + 0.16 + 0.36
    # = 0.56 over 3 tokens (M2 0.1867); squared ages 1 + 1 + 4 = 6, so 0.56 / 6 = 0.0933 per version^2.
    logp_old = torch.tensor([[0.2, -0.4], [0.6, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    ages = torch.tensor([[1, 1], [2, 2]])
    out = offpolicy_stats(logp_old, torch.zeros(2, 2), mask, ages)
    assert float(out["offpolicy/m2"].value) == pytest.approx(0.56 / 3)
    assert float(out["offpolicy/m2_per_version"].value) == pytest.approx(0.56 / 6)
    assert float(out["offpolicy/m2_per_version"].weight) == 3.0


def test_m2_per_version_counts_fresh_tokens_mismatch_and_needs_a_stale_one() -> None:
    logp_old = torch.tensor([[0.1, 0.3]])
    mask = torch.ones(1, 2)
    # Age 0 and 1: the fresh token's 0.01 (engine mismatch) still counts: (0.01 + 0.09) / 1.
    out = offpolicy_stats(logp_old, torch.zeros(1, 2), mask, torch.tensor([[0, 1]]))
    assert float(out["offpolicy/m2_per_version"].value) == pytest.approx(0.1)
    # All fresh (on-policy): no rate is measured; without ages, none either.
    assert "offpolicy/m2_per_version" not in offpolicy_stats(logp_old, torch.zeros(1, 2), mask, torch.zeros(1, 2))
    assert "offpolicy/m2_per_version" not in offpolicy_stats(logp_old, torch.zeros(1, 2), mask)


# ------------------------------------------------------------------------------------- the bound


@pytest.mark.parametrize(
    "rate, expected",
    [
        (0.1, 1),  # 0.1 * 1 = 0.1 <= 0.1, 0.1 * 4 > 0.1
        (0.024, 2),  # 0.096 at k = 2, 0.216 at k = 3
        (0.0062, 4),  # 0.0992 at k = 4, 0.155 at k = 5
        (0.001, 8),  # sqrt(100) = 10, capped at max_staleness 8
        (0.0, 8),  # no measurable drift: the hard limit
        (5.0, 1),  # far off: the floor
    ],
)
def test_bound_is_the_largest_k_whose_predicted_m2_fits(rate: float, expected: int) -> None:
    assert bound_for(rate, m2_target=0.1, low=1, high=8) == expected


def test_the_bound_starts_at_the_floor_and_follows_the_smoothed_rate() -> None:
    b = StalenessBound(8, AdaptiveStaleness(m2_target=0.1, min_staleness=1))
    assert b.bound == 1
    b.update({"offpolicy/m2": 0.3})  # no stale token measured: nothing to go on
    assert b.bound == 1 and b.rate is None
    b.update({"offpolicy/m2_per_version": 0.001})
    assert b.rate == 0.001 and b.bound == 8
    b.update({"offpolicy/m2_per_version": 0.02})  # a faster-moving step: the estimate moves half way
    assert b.rate == pytest.approx(SMOOTHING * 0.02 + (1 - SMOOTHING) * 0.001)
    assert b.bound == math.floor(math.sqrt(0.1 / b.rate)) == 3
    for _ in range(20):
        b.update({"offpolicy/m2_per_version": 0.5})
    assert b.bound == 1
    b.update({"offpolicy/m2_per_version": float("nan")})  # a broken measurement changes nothing
    assert b.bound == 1 and b.rate == pytest.approx(0.5)


def test_without_adaptation_the_bound_is_max_staleness() -> None:
    b = StalenessBound(4, None)
    b.update({"offpolicy/m2_per_version": 100.0})
    assert b.bound == 4 and b.rate is None


def simulate(steps: int, max_staleness: int, rates: list[float], seed: int) -> list[tuple[int, int]]:
    """The driver loop's bookkeeping with the adaptive bound: (staleness batch b is trained at, the
    bound when it was dispatched) per batch; the measured rate of each step is given."""
    rng = random.Random(seed)
    bound = StalenessBound(max_staleness, AdaptiveStaleness(m2_target=0.1, min_staleness=1))
    version = published = 0
    next_batch, out = 1, []
    dispatched: dict[int, tuple[int, int]] = {}  # batch -> (weights that generate it, bound in effect)
    for step in range(1, steps + 1):
        while next_batch <= steps and may_dispatch(next_batch, step, version, published, 1, bound.bound):
            dispatched[next_batch] = (published, bound.bound)
            next_batch += 1
        generated_from, dispatched_under = dispatched[step]
        out.append((version - generated_from, dispatched_under))
        if rng.random() >= 0.1:  # a skipped step now and then
            version += 1
        published = version
        bound.update({"offpolicy/m2_per_version": rates[step - 1]})
    return out


def test_a_moving_bound_holds_every_batch_to_the_bound_it_went_out_under() -> None:
    # Slow drift, then fast (the bound drops from 8 to 1), then slow again (the estimate decays by
    # half a step from 1.0 to under 0.1 / 64, about 10 steps, then the bound climbs back to 8).
    rates = [0.001] * 15 + [1.0] * 15 + [0.001] * 30
    for seed in range(5):
        trained = simulate(60, 8, rates, seed)
        assert all(staleness <= under <= 8 for staleness, under in trained)
        stalenesses, bounds = [s for s, _ in trained], [b for _, b in trained]
        assert set(bounds[5:15]) == {8} and max(stalenesses[5:15]) >= 6  # far ahead while the policy moves slowly
        # The batches out when the rate jumped (step 16) keep their bound; from then on at most 1 old.
        assert set(bounds[16 + 8 : 30]) == {1} and max(stalenesses[16 + 8 : 30]) <= 1
        assert set(bounds[52:]) == {8} and max(stalenesses[52:]) >= 6


# ------------------------------------------------------------------------------------ the config


def test_config_refuses_a_floor_above_the_limit_and_rare_publishes() -> None:
    cfg = load_config(None, ["rollout.max_staleness=4", "rollout.adaptive_staleness={m2_target: 0.05}"])
    assert cfg.rollout.adaptive_staleness == AdaptiveStaleness(m2_target=0.05, min_staleness=1)
    assert load_config(None, ["rollout.max_staleness=4"]).rollout.adaptive_staleness is None
    with pytest.raises(ConfigError, match="min_staleness=3 is above rollout.max_staleness=2"):
        load_config(None, ["rollout.max_staleness=2", "rollout.adaptive_staleness={min_staleness: 3}"])
    with pytest.raises(ConfigError, match="2 versions behind, more than rollout.adaptive_staleness.min_staleness=1"):
        load_config(None, ["rollout.max_staleness=4", "rollout.adaptive_staleness={}", "weight_sync.every=3"])
    with pytest.raises(ConfigError, match="correction type behavior skips"):
        load_config(
            None,
            ["rollout.max_staleness=4", "rollout.adaptive_staleness={}", "algorithm.loss.correction={type: behavior}"],
        )
    with pytest.raises(ConfigError, match="m2_target"):
        load_config(None, ["rollout.max_staleness=4", "rollout.adaptive_staleness={m2_target: 0}"])
