"""M2PO (Zheng et al. 2025): the batch mask, the unclipped masked surrogate, and its config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tidal.config import (
    ClipTrustRegion,
    ConfigError,
    LossConfig,
    M2POTrustRegion,
    NoCorrection,
    TISCorrection,
    load_config,
)
from tidal.telemetry.metrics import Stat
from tidal.trainer.losses import m2po_loss, policy_loss
from tidal.trainer.offpolicy import m2po_mask

pytestmark = pytest.mark.unit

NAN, INF, LN2 = float("nan"), float("inf"), math.log(2.0)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.float32)


def val(s: Stat) -> float:
    return float(s.value)


# ------------------------------------------------------------------------------------------ the mask

# log(pi_old / mu) = [0.1, -0.5 | 0.3, 1.0] on the valid tokens of two rows (the third column is
# padding, NaN and 7.0 there must not count). Squares 0.01, 0.25 | 0.09, 1.0: M2 = 1.35 / 4 = 0.3375.
LOGP_OLD = t([0.1, -0.5, NAN], [0.3, 1.0, 7.0])
LOGP_MU = torch.zeros(2, 3)
MASK = t([1, 1, 0], [1, 1, 0])


@pytest.mark.parametrize(
    "tau, keep, kept_m2",
    [
        # 0.3375 <= 1: nothing is dropped.
        (1.0, [[1, 1, 0], [1, 1, 0]], 0.3375),
        # Drop 1.0 (the largest square): (0.01 + 0.25 + 0.09) / 3 = 0.1167 <= 0.2.
        (0.2, [[1, 1, 0], [1, 0, 0]], 0.35 / 3),
        # 0.1167 > 0.1, drop 0.25 next (|-0.5| beats 0.3: the sign does not matter): 0.1 / 2 = 0.05 <= 0.1.
        (0.1, [[1, 0, 0], [1, 0, 0]], 0.05),
        # 0.05 > 0.04, drop 0.09: 0.01 <= 0.04.
        (0.04, [[1, 0, 0], [0, 0, 0]], 0.01),
        # Even the smallest square 0.01 exceeds 0.005: every token is dropped (AReaL keeps the last one).
        (0.005, [[0, 0, 0], [0, 0, 0]], 0.0),
    ],
)
def test_mask_drops_the_largest_squares_until_the_kept_m2_is_within_tau(
    tau: float, keep: list[list[int]], kept_m2: float
) -> None:
    got, m = m2po_mask(LOGP_OLD, LOGP_MU, MASK, tau)
    assert got.dtype == torch.bool and got.tolist() == [[bool(x) for x in row] for row in keep]
    dropped = 4 - sum(map(sum, keep))
    assert val(m["offpolicy/m2_masked_frac"]) == pytest.approx(dropped / 4)
    assert float(m["offpolicy/m2_masked_frac"].weight) == 4  # a mean over the valid tokens
    assert val(m["offpolicy/m2_kept"]) == pytest.approx(kept_m2, abs=1e-7)
    assert float(m["offpolicy/m2_kept"].weight) == 4 - dropped
    assert val(m["offpolicy/m2_kept"]) <= tau


def test_mask_drops_non_finite_log_ratios_first_and_ignores_padding() -> None:
    # Valid: log k = +inf (mu gave the token probability 0), 0.1, 0; padding holds NaN and -inf.
    logp_old = t([-1.0, 0.1, 0.0, NAN, 0.0])
    logp_mu = t([-INF, 0.0, 0.0, 0.0, -INF])
    mask = t([1, 1, 1, 0, 0])
    keep, m = m2po_mask(logp_old, logp_mu, mask, 0.04)
    # Without the infinite one: (0.01 + 0) / 2 = 0.005 <= 0.04.
    assert keep.tolist() == [[False, True, True, False, False]]
    assert val(m["offpolicy/m2_masked_frac"]) == pytest.approx(1 / 3)
    assert val(m["offpolicy/m2_kept"]) == pytest.approx(0.005)
    keep, m = m2po_mask(logp_old, logp_mu, torch.zeros(1, 5), 0.04)  # nothing valid
    assert not keep.any() and val(m["offpolicy/m2_masked_frac"]) == 0 and float(m["offpolicy/m2_kept"].weight) == 0


def test_mask_is_deterministic_on_ties_and_stops_at_equality() -> None:
    # Four equal squares 0.25 and a zero (exact in binary): M2 = 1 / 5 = 0.2 > 0.1875, so one of the
    # ties goes, the first in row-major order; then (3 * 0.25 + 0) / 4 = 0.1875 <= 0.1875 stops it
    # (AReaL's strict < would drop a second one).
    logp_old = t([0.5, -0.5, 0.5, -0.5, 0.0])
    keep, m = m2po_mask(logp_old, torch.zeros(1, 5), torch.ones(1, 5), 0.1875)
    assert keep.tolist() == [[False, True, True, True, True]]
    assert val(m["offpolicy/m2_kept"]) == 0.1875


def test_mask_rejects_a_non_positive_threshold() -> None:
    with pytest.raises(ValueError, match="threshold must be > 0"):
        m2po_mask(LOGP_OLD, LOGP_MU, MASK, 0.0)


# ------------------------------------------------------------------------------------------ the loss


def test_m2po_loss_is_unclipped_and_dropped_tokens_get_zero_gradient() -> None:
    # r = [1.5, 0.5, 3.0 | padding], A = [1, -1, 2]; the third token is dropped by the mask.
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(3.0), 0.0]], requires_grad=True)
    logp_old = t([0.0, 0.0, 0.0, NAN])
    A = t([1.0, -1.0, 2.0, NAN])
    mask = t([1, 1, 1, 0])
    keep = torch.tensor([[True, True, False, True]])  # True on padding does not make it count
    H = t([0.5, 1.0, 2.0, 9.0])
    loss, m = m2po_loss(logp, logp_old, A, mask, keep, entropy=H)
    # -r A with no clip: PPO would clip 1.5 at 1.28 (A > 0) and 0.5 at 0.8 (A < 0).
    assert loss.flatten().tolist() == pytest.approx([-1.5, 0.5, 0.0, 0.0])
    loss.sum().backward()
    assert logp.grad is not None
    assert logp.grad.flatten().tolist() == pytest.approx([-1.5, 0.5, 0.0, 0.0])  # d(-rA)/dlogp = -rA; 0 where dropped
    assert val(m["train/ratio_mean"]) == pytest.approx(5.0 / 3) and val(m["train/ratio_max"]) == pytest.approx(3.0)
    assert val(m["offpolicy/clipped_token_entropy"]) == pytest.approx(2.0)  # the dropped token's
    assert val(m["offpolicy/clipped_pos_adv_frac"]) == 1.0 and float(m["offpolicy/clipped_pos_adv_frac"].weight) == 1


def test_huge_threshold_is_the_unclipped_importance_weighted_policy_gradient() -> None:
    # log k = log(pi_old / mu) = [ln 2, -ln 2, 0]; r = pi / pi_old = [1.5, 1, 0.5]; pi / mu = k r = [3, 0.5, 0.5].
    logp_mu = t([0.0, 0.0, 0.0, NAN])
    logp_old = t([LN2, -LN2, 0.0, NAN])
    logp = (logp_old + t([math.log(1.5), 0.0, math.log(0.5), 0.0])).requires_grad_(True)
    A, mask = t([1.0, -2.0, 1.0, NAN]), t([1, 1, 1, 0])
    keep, m = m2po_mask(logp_old, logp_mu, mask, 1e9)
    assert keep.tolist() == [[True, True, True, False]] and val(m["offpolicy/m2_masked_frac"]) == 0
    cfg = LossConfig(correction=TISCorrection(c=1e9), trust_region=M2POTrustRegion(threshold=1e9))
    loss, _ = policy_loss(logp, logp_old, logp_mu, A, mask, cfg, keep=keep)
    assert loss.flatten().tolist() == pytest.approx([-3.0, 1.0, -0.5, 0.0])  # -(pi / mu) A, the paper's objective
    loss.sum().backward()
    assert logp.grad is not None and logp.grad.flatten().tolist() == pytest.approx([-3.0, 1.0, -0.5, 0.0])
    clip = LossConfig(correction=TISCorrection(c=1e9), trust_region=ClipTrustRegion())
    clipped, _ = policy_loss(logp, logp_old, logp_mu, A, mask, clip)
    assert clipped.flatten().tolist() == pytest.approx([-2 * 1.28, 1.0, -0.5, 0.0])  # the clip caps r = 1.5 at 1.28


def test_policy_loss_needs_the_batch_mask_under_m2po() -> None:
    cfg = LossConfig(correction=NoCorrection(), trust_region=M2POTrustRegion())
    x = t([0.0])
    with pytest.raises(ValueError, match="needs `keep`"):
        policy_loss(x, x, x, t([1.0]), t([1]), cfg)
    loss, m = policy_loss(x, x, x - 5.0, t([1.0]), t([1]), cfg, keep=torch.tensor([[False]]))
    assert loss.tolist() == [[0.0]]  # dropped; with `none` the weight ignores mu, so k = e^5 does not enter
    assert "train/clip_frac" not in m


# ------------------------------------------------------------------------------------------ config


def test_trust_region_defaults_to_the_unchanged_clip() -> None:
    assert LossConfig().trust_region == ClipTrustRegion(eps_low=0.2, eps_high=0.28, dual_clip=None)
    cfg = load_config(None, ["algorithm.loss.trust_region.eps_high=0.3"])
    assert cfg.algorithm.loss.trust_region == ClipTrustRegion(eps_high=0.3)


def test_m2po_config_from_yaml(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("algorithm:\n  loss:\n    trust_region: {type: m2po, threshold: 0.05}\n")
    assert load_config(f).algorithm.loss.trust_region == M2POTrustRegion(threshold=0.05)
    assert load_config(None, ["algorithm.loss.trust_region.type=m2po"]).algorithm.loss.trust_region.threshold == 0.04


@pytest.mark.parametrize(
    "overrides, error",
    [
        (
            ["algorithm.loss.trust_region.type=m2po", "algorithm.loss.trust_region.threshold=0"],
            "config key 'algorithm.loss.trust_region.threshold': Input should be greater than 0",
        ),
        (
            ["algorithm.loss.trust_region.type=m2po", "algorithm.loss.trust_region.threshold=-0.1"],
            "config key 'algorithm.loss.trust_region.threshold': Input should be greater than 0",
        ),
        (
            ["algorithm.loss.trust_region.type=m2po", "algorithm.loss.trust_region.eps_high=0.3"],
            "unknown config key 'algorithm.loss.trust_region.eps_high'",
        ),
        (["algorithm.loss.trust_region.threshold=0.04"], "unknown config key 'algorithm.loss.trust_region.threshold'"),
        (["algorithm.loss.trust_region.type=ppo"], "'algorithm.loss.trust_region.type'.*'clip', 'm2po'"),
        (["algorithm.loss.eps_high=0.3"], "algorithm.loss.eps_high is now algorithm.loss.trust_region.eps_high"),
        (
            ["algorithm.loss.trust_region.type=m2po", "algorithm.loss.correction.type=behavior"],
            "m2po .* needs the recomputed pi_old",
        ),
    ],
)
def test_bad_trust_region_configs_say_what_to_change(overrides: list[str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_config(None, overrides)


def test_threshold_validates_in_code_too() -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        M2POTrustRegion(threshold=0.0)
