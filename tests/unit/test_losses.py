from __future__ import annotations

import math

import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from tidal.config import (
    BehaviorCorrection,
    ClipTrustRegion,
    KLConfig,
    LossConfig,
    M2POTrustRegion,
    MaskCorrection,
    NoCorrection,
    TISCorrection,
)
from tidal.model.forward import entropy as entropy_from_logits
from tidal.model.forward import token_logprobs
from tidal.telemetry.metrics import Stat, merge
from tidal.trainer.losses import (
    aggregate,
    expert_load_stats,
    importance_weights,
    kl_penalty,
    policy_loss,
    ppo_clip_loss,
    sequence_aux_loss,
    switch_aux_loss,
)
from tidal.trainer.offpolicy import m2po_mask, offpolicy_stats

pytestmark = pytest.mark.unit

LN2, LN3 = math.log(2.0), math.log(3.0)
NAN, INF = float("nan"), float("inf")


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.float32)


def approx(x: torch.Tensor | Stat, expected: list[list[float]] | float, tol: float = 1e-5) -> bool:
    x = x.value if isinstance(x, Stat) else x
    want = torch.tensor(expected, dtype=torch.float32)
    return x.shape == want.shape and x.flatten().tolist() == pytest.approx(want.flatten().tolist(), abs=tol)


# ------------------------------------------------------------------------------------ log-probs, entropy

# Position 0 predicts token 1: softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]; position 1 predicts token 2:
# softmax([ln 3, 0, 0]) = [3/5, 1/5, 1/5]. The last position's logits predict nothing.
LOGITS = torch.tensor([[[0.0, 0.0, LN2], [LN3, 0.0, 0.0], [9.0, -9.0, 0.0]]])  # (1, 3, 3)
IDS = torch.tensor([[1, 2, 0]])


def test_token_logprobs_hand_values_and_temperature() -> None:
    assert approx(token_logprobs(LOGITS, IDS), [[0.0, math.log(0.5), math.log(0.6)]])
    assert approx(token_logprobs(LOGITS, IDS, temperature=0.0), [[0.0, math.log(0.5), math.log(0.6)]])
    # Temperature 2: exp(z / 2) = [1, 1, sqrt 2] and [sqrt 3, 1, 1].
    p1, p2 = math.sqrt(2) / (2 + math.sqrt(2)), math.sqrt(3) / (math.sqrt(3) + 2)
    assert approx(token_logprobs(LOGITS, IDS, temperature=2.0), [[0.0, math.log(p1), math.log(p2)]])


def test_entropy_hand_values_and_gradient() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    H = entropy_from_logits(logits)
    h1 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.5))  # = 1.5 ln 2
    h2 = -(0.6 * math.log(0.6) + 0.4 * math.log(0.2))
    assert approx(H, [[0.0, h1, h2]])
    H.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad[0, 1].abs().sum() > 0


# ------------------------------------------------------------------------------------ importance weights


def test_tis_clamp_applies_to_the_weight_and_masked_values_do_not_leak() -> None:
    # log k = [ln 3, ln 0.5, 0, NaN at a masked position]; c = 2.
    logp_old = t([LN3, math.log(0.5), 0.0, NAN])
    logp_mu = t([0.0, 0.0, 0.0, 0.0])
    mask = t([1, 1, 1, 0])
    w, m = importance_weights(logp_old, logp_mu, mask, TISCorrection(c=2.0))
    assert approx(w, [[2.0, 0.5, 1.0, 0.0]])  # 3 is truncated to 2, not passed through
    assert approx(m["offpolicy/frac_truncated"], 1 / 3)
    assert approx(m["offpolicy/is_weight_mean"], 3.5 / 3)
    assert approx(m["offpolicy/is_weight_max"], 2.0)
    assert approx(m["offpolicy/log_ratio_abs_mean"], (LN3 + LN2) / 3)
    assert approx(m["offpolicy/log_ratio_abs_max"], LN3)
    assert approx(m["offpolicy/frac_masked"], 0.0)


def test_mask_correction_zeroes_out_of_range_tokens() -> None:
    logp_old = t([LN3, math.log(0.5), 0.0, math.log(0.4)])
    w, m = importance_weights(logp_old, torch.zeros(1, 4), torch.ones(1, 4), MaskCorrection(low=0.5, high=2.0))
    assert approx(w, [[0.0, 0.5, 1.0, 0.0]])  # k = 3 and k = 0.4 are outside [0.5, 2]
    assert approx(m["offpolicy/frac_masked"], 0.5)


def test_sequence_level_is_the_product_and_geometric_the_mean() -> None:
    logp_old, logp_mu, mask = torch.full((1, 100), 0.1), torch.zeros(1, 100), torch.ones(1, 100)
    big = TISCorrection(c=1e6)
    w_tok, _ = importance_weights(logp_old, logp_mu, mask, big)
    w_seq, _ = importance_weights(logp_old, logp_mu, mask, TISCorrection(level="sequence", c=1e6))
    w_geo, _ = importance_weights(logp_old, logp_mu, mask, TISCorrection(level="geometric", c=1e6))
    assert torch.allclose(w_tok, torch.full((1, 100), 1.1051709))  # e^0.1
    assert torch.allclose(w_seq, torch.full((1, 100), 22026.4658), rtol=1e-4)  # e^10
    assert torch.allclose(w_geo, torch.full((1, 100), 1.1051709))  # e^0.1, not e^10
    # Masked tokens neither count nor receive a weight: log k = [ln 2, ln 2, masked NaN].
    old, mu, m = t([LN2, LN2, NAN]), torch.zeros(1, 3), t([1, 1, 0])
    assert approx(importance_weights(old, mu, m, MaskCorrection(level="sequence", high=5.0))[0], [[4.0, 4.0, 0.0]])
    assert approx(importance_weights(old, mu, m, MaskCorrection(level="geometric", high=5.0))[0], [[2.0, 2.0, 0.0]])


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_behavior_logprob_minus_inf_is_infinite_k(level: str) -> None:
    logp_old = t([-1.0, -2.0, 0.0], [-1.0, -1.0, 0.0])
    logp_mu = t([-INF, -2.0, NAN], [-1.0, -1.0, 0.0])  # -inf on a valid token, NaN on a masked one
    mask = t([1, 1, 0], [1, 1, 0])
    w_tis, m_tis = importance_weights(logp_old, logp_mu, mask, TISCorrection(level=level, c=2.0))
    w_mask, m_mask = importance_weights(logp_old, logp_mu, mask, MaskCorrection(level=level))
    row0_tis = [2.0, 1.0, 0.0] if level == "token" else [2.0, 2.0, 0.0]
    row0_mask = [0.0, 1.0, 0.0] if level == "token" else [0.0, 0.0, 0.0]
    assert approx(w_tis, [row0_tis, [1.0, 1.0, 0.0]])
    assert approx(w_mask, [row0_mask, [1.0, 1.0, 0.0]])
    for v in [*m_tis.values(), *m_mask.values()]:
        assert torch.isfinite(v.value)
    assert approx(m_tis["offpolicy/log_ratio_abs_max"], 0.0)  # the infinite log-ratio is left out


@pytest.mark.parametrize("correction", [NoCorrection(), BehaviorCorrection()])
def test_no_weight_corrections_give_one_on_valid_tokens(correction: NoCorrection | BehaviorCorrection) -> None:
    logp_old = t([0.0, 5.0, 0.0]).requires_grad_(True)
    w, m = importance_weights(logp_old, t([-INF, 0.0, NAN]), t([1, 1, 0]), correction)
    assert approx(w, [[1.0, 1.0, 0.0]]) and not w.requires_grad
    assert approx(m["offpolicy/log_ratio_abs_mean"], 5.0)


# ------------------------------------------------------------------------------------------ PPO clip


def test_asymmetric_clip_hand_values() -> None:
    r = [1.5, 1.5, 0.5, 0.5, 1.1]
    logp = torch.tensor([[math.log(x) for x in r]], requires_grad=True)
    A = t([1.0, -1.0, 1.0, -1.0, 2.0])
    loss, m = ppo_clip_loss(logp, torch.zeros(1, 5), A, torch.ones(1, 5), eps_low=0.1, eps_high=0.3)
    # max(-rA, -clip(r, 0.9, 1.3) A): -1.3 (clipped high), 1.5, -0.5, 0.9 (clipped low at 0.9), -2.2.
    assert approx(loss, [[-1.3, 1.5, -0.5, 0.9, -2.2]])
    assert approx(m["train/clip_frac"], 2 / 5)
    assert approx(m["train/ratio_mean"], 5.1 / 5) and approx(m["train/ratio_max"], 1.5)
    loss.sum().backward()
    assert logp.grad is not None  # d(-rA)/dlogp = -rA on unclipped tokens, 0 on clipped ones
    assert approx(logp.grad, [[0.0, 1.5, -0.5, 0.0, -2.2]])


def test_dual_clip_bounds_negative_advantage_with_large_ratio() -> None:
    logp = t([math.log(10.0), math.log(10.0), math.log(2.0)])
    A = t([-1.0, 1.0, -1.0])
    loss, m = ppo_clip_loss(logp, torch.zeros(1, 3), A, torch.ones(1, 3), 0.2, 0.3, dual_clip=3.0)
    # r=10, A=-1: max(10, 1.3) = 10, bounded by -cA = 3.  r=10, A=1: -1.3.  r=2, A=-1: 2 < 3 stays.
    assert approx(loss, [[3.0, -1.3, 2.0]])
    assert approx(m["train/dual_clip_frac"], 1 / 3)
    no_dual, _ = ppo_clip_loss(logp, torch.zeros(1, 3), A, torch.ones(1, 3), 0.2, 0.3)
    assert approx(no_dual, [[10.0, -1.3, 2.0]])


def test_gspo_sequence_ratio_is_exp_of_the_mean() -> None:
    logp = t([0.2, 0.4, -INF]).requires_grad_(True)  # the masked token is -inf
    logp_old = t([0.0, 0.0, NAN])
    loss, m = ppo_clip_loss(logp, logp_old, t([1.0, 1.0, NAN]), t([1, 1, 0]), 10.0, 10.0, ratio="sequence")
    s = math.exp(0.3)  # exp(mean(0.2, 0.4)), not exp(0.6)
    assert approx(loss, [[-s, -s, 0.0]])
    assert approx(m["train/ratio_mean"], s)
    loss.sum().backward()
    assert logp.grad is not None and approx(logp.grad, [[-s, -s, 0.0]])  # GSPO-token: gradient per token
    long_loss, _ = ppo_clip_loss(
        torch.full((1, 100), 0.1),
        torch.zeros(1, 100),
        torch.ones(1, 100),
        torch.ones(1, 100),
        1e6,
        1e6,
        ratio="sequence",
    )
    assert torch.allclose(long_loss, torch.full((1, 100), -1.1051709))  # e^0.1, not e^10


# ------------------------------------------------------------------------------------------ diagnostics


def test_offpolicy_stats_hand_values() -> None:
    # Valid log k = [0, ln 2, -ln 2, 0], so k = [1, 2, 0.5, 1]: sum k = 4.5, sum k^2 = 6.25 and
    # ESS = 4.5^2 / (4 * 6.25) = 0.81; M2 = 2 ln^2 2 / 4. A valid token with mu = 0 (log k = +inf) and
    # the padding (NaN) are left out.
    logp_old = t([0.0, LN2, -LN2, 0.0, -1.0, NAN])
    logp_mu = t([0.0, 0.0, 0.0, 0.0, -INF, 0.0])
    mask = t([1, 1, 1, 1, 1, 0])
    m = offpolicy_stats(logp_old, logp_mu, mask)
    assert approx(m["offpolicy/ess"], 0.81) and float(m["offpolicy/ess"].weight) == 4
    assert approx(m["offpolicy/m2"], LN2**2 / 2) and float(m["offpolicy/m2"].weight) == 4
    on_policy = offpolicy_stats(logp_old, logp_old, mask)
    assert approx(on_policy["offpolicy/ess"], 1.0) and approx(on_policy["offpolicy/m2"], 0.0)
    # One weight e^400 (beyond float64) dominates four: ESS -> 1/4, without overflow.
    m = offpolicy_stats(t([400.0, 0.0, 0.0, 0.0]), torch.zeros(1, 4), torch.ones(1, 4))
    assert approx(m["offpolicy/ess"], 0.25) and approx(m["offpolicy/m2"], 400.0**2 / 4, tol=1e-2)


def test_truncated_token_entropy_is_over_the_tokens_the_correction_cuts() -> None:
    logp_old = t([LN3, math.log(0.5), 0.0, math.log(0.4), NAN])  # k = [3, 0.5, 1, 0.4]
    mu, mask, H = torch.zeros(1, 5), t([1, 1, 1, 1, 0]), t([2.0, 1.0, 0.5, 4.0, 99.0])
    _, m = importance_weights(logp_old, mu, mask, TISCorrection(c=2.0), entropy=H)
    assert approx(m["offpolicy/truncated_token_entropy"], 2.0)  # only k = 3 is truncated
    assert float(m["offpolicy/truncated_token_entropy"].weight) == 1
    _, m = importance_weights(logp_old, mu, mask, MaskCorrection(low=0.5, high=2.0), entropy=H)
    assert approx(m["offpolicy/truncated_token_entropy"], 3.0)  # k = 3 and 0.4 are masked: (2 + 4) / 2
    _, m = importance_weights(logp_old, mu, mask, NoCorrection(), entropy=H)
    none = m["offpolicy/truncated_token_entropy"]
    assert approx(none, 0.0) and float(none.weight) == 0
    assert "offpolicy/truncated_token_entropy" not in importance_weights(logp_old, mu, mask, NoCorrection())[1]


def test_clipped_token_diagnostics_and_their_merge_over_micro_batches() -> None:
    # As in test_asymmetric_clip_hand_values: tokens 0 (r = 1.5, A = 1) and 3 (r = 0.5, A = -1) are clipped.
    logp = t([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.1)])
    A, H = t([1.0, -1.0, 1.0, -1.0, 2.0]), t([1.0, 2.0, 3.0, 4.0, 5.0])
    _, m = ppo_clip_loss(logp, torch.zeros(1, 5), A, torch.ones(1, 5), 0.1, 0.3, entropy=H)
    assert approx(m["offpolicy/clipped_token_entropy"], 2.5)  # (1 + 4) / 2, beside a mean entropy of 3
    assert approx(m["offpolicy/clipped_pos_adv_frac"], 0.5)  # one above 1 + eps_high, one below 1 - eps_low
    assert float(m["offpolicy/clipped_token_entropy"].weight) == 2
    # Split into micro-batches [0, 1] and [2, 3, 4], the declared reductions give the same values.
    parts = [
        ppo_clip_loss(logp[:, s], torch.zeros(1, 5)[:, s], A[:, s], torch.ones(1, 5)[:, s], 0.1, 0.3, entropy=H[:, s])[
            1
        ]
        for s in (slice(0, 2), slice(2, 5))
    ]
    merged = merge(parts)
    for key in ("offpolicy/clipped_token_entropy", "offpolicy/clipped_pos_adv_frac", "train/clip_frac"):
        assert approx(merged[key], float(m[key].value)), key
    _, m = ppo_clip_loss(logp, torch.zeros(1, 5), A, torch.ones(1, 5), 10.0, 10.0, entropy=H)
    none = m["offpolicy/clipped_token_entropy"]
    assert approx(none, 0.0) and float(none.weight) == 0


# ------------------------------------------------------------------------------------------ KL


def test_kl_estimators_hand_values() -> None:
    logp = t([math.log(0.5), math.log(0.25)]).requires_grad_(True)
    logp_ref = t([math.log(0.25), math.log(0.5)])
    assert approx(kl_penalty(logp, logp_ref, "k1"), [[LN2, -LN2]])
    assert approx(kl_penalty(logp, logp_ref, "k2"), [[0.5 * LN2**2, 0.5 * LN2**2]])
    k3 = kl_penalty(logp, logp_ref, "k3")  # rho - 1 - log rho with rho = 1/2 and 2
    assert approx(k3, [[0.5 - 1 + LN2, 2 - 1 - LN2]])
    k3.sum().backward()
    assert logp.grad is not None and approx(logp.grad, [[0.5, -1.0]])  # d/dlogp = 1 - rho
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, logp_ref, "k4")


# ------------------------------------------------------------------------------------------ policy loss


def test_policy_loss_tis_always_applies_the_weight() -> None:
    logp_old = t([LN3, 0.0, 0.0])
    cfg = LossConfig(correction=TISCorrection(c=2.0))
    loss, m = policy_loss(logp_old.clone(), logp_old, t([0.0, 0.0, -INF]), t([1.0, -2.0, 5.0]), t([1, 1, 0]), cfg)
    # r = 1, clip loss = -A = [-1, 2]; w = [min(3, 2), 1] -> [-2, 2].
    assert approx(loss, [[-2.0, 2.0, 0.0]])
    assert approx(m["train/pg_loss"], 0.0) and approx(m["offpolicy/frac_truncated"], 0.5)


def test_policy_loss_behavior_and_none_pick_the_proximal_policy() -> None:
    logp, mask, A = t([math.log(1.1)]), t([1]), t([1.0])
    behavior = LossConfig(correction=BehaviorCorrection())
    loss, _ = policy_loss(logp, None, torch.zeros(1, 1), A, mask, behavior)
    assert approx(loss, [[-1.1]])  # r = pi / mu = 1.1, inside the clip range
    none = LossConfig(correction=NoCorrection())
    loss, _ = policy_loss(logp, logp.clone(), t([-INF]), A, mask, none)
    assert approx(loss, [[-1.0]])  # r = pi / pi_old = 1; mu ignored
    with pytest.raises(ValueError, match="logp_mu"):
        policy_loss(logp, logp, None, A, mask, LossConfig())


def test_policy_loss_mask_correction_drops_out_of_range_tokens() -> None:
    cfg = LossConfig(correction=MaskCorrection(low=0.5, high=2.0))
    logp_old = t([LN3, 0.0])
    loss, _ = policy_loss(logp_old.clone(), logp_old, torch.zeros(1, 2), t([1.0, 1.0]), t([1, 1]), cfg)
    assert approx(loss, [[0.0, -1.0]])


def test_policy_loss_adds_kl_and_subtracts_entropy() -> None:
    cfg = LossConfig(correction=NoCorrection(), kl=KLConfig(coef=0.1, type="k1"), entropy_coef=0.01)
    logp = t([0.0, 0.0])
    loss, m = policy_loss(
        logp, logp.clone(), None, t([1.0, -1.0]), t([1, 1]), cfg, logp_ref=t([-LN2, 0.0]), entropy=t([2.0, 1.0])
    )
    # pg = [-1, 1]; k1 = [ln 2, 0]; per token = pg + 0.1 k1 - 0.01 H.
    assert approx(loss, [[-1 + 0.1 * LN2 - 0.02, 1 - 0.01]])
    assert approx(m["train/kl"], LN2 / 2) and approx(m["train/entropy"], 1.5)
    with pytest.raises(ValueError, match="logp_ref"):
        policy_loss(logp, logp, None, t([1.0, -1.0]), t([1, 1]), cfg, entropy=t([2.0, 1.0]))
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, logp, None, t([1.0, -1.0]), t([1, 1]), cfg, logp_ref=logp)


# ------------------------------------------------------------------------------------------ aggregation

PER_TOKEN = t([1.0, 2.0, 3.0, NAN], [4.0, 9.0, 9.0, 9.0], [5.0, 6.0, INF, 0.0])
MASK = t([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0])


@pytest.mark.parametrize(
    "mode, num, den",
    [
        ("token-mean", 10.0, 4.0),  # (1 + 2 + 3 + 4) / 4 valid tokens
        ("sequence-mean", 6.0, 2.0),  # (2 + 4) / 2 sequences with a valid token
        ("constant", 10.0, 15.0),  # 10 / (3 rows * max_len 5)
    ],
)
def test_aggregate_hand_values_and_additivity_over_row_splits(mode: str, num: float, den: float) -> None:
    n, d = aggregate(PER_TOKEN, MASK, mode, max_len=5)
    assert approx(n, num) and d == den
    (n1, d1), (n2, d2) = aggregate(PER_TOKEN[:1], MASK[:1], mode, 5), aggregate(PER_TOKEN[1:], MASK[1:], mode, 5)
    assert approx(n1 + n2, num) and d1 + d2 == den


def test_constant_aggregation_needs_max_len() -> None:
    with pytest.raises(ValueError, match="max_len"):
        aggregate(PER_TOKEN, MASK, "constant")


@pytest.mark.parametrize("trust", [ClipTrustRegion(dual_clip=3.0), M2POTrustRegion()])
def test_everything_is_zero_and_finite_when_nothing_is_valid(trust: ClipTrustRegion | M2POTrustRegion) -> None:
    B, T, V = 2, 3, 4
    logits = torch.randn(B, T, V, requires_grad=True)
    mask = torch.zeros(B, T)
    logp = token_logprobs(logits, torch.zeros(B, T, dtype=torch.long))
    entropy = entropy_from_logits(logits)
    bad = torch.full((B, T), NAN)
    cfg = LossConfig(
        correction=TISCorrection(level="sequence"),
        ratio="sequence",
        trust_region=trust,
        kl=KLConfig(coef=0.1),
        entropy_coef=0.01,
    )
    mu = torch.full((B, T), -INF)
    keep, batch_metrics = m2po_mask(bad, mu, mask, 0.04)
    per_token, metrics = policy_loss(logp, bad, mu, bad, mask, cfg, keep=keep, logp_ref=bad, entropy=entropy)
    metrics |= batch_metrics | offpolicy_stats(bad, mu, mask)
    assert "offpolicy/clipped_token_entropy" in metrics and "offpolicy/truncated_token_entropy" in metrics
    assert approx(per_token, [[0.0] * T] * B)
    assert all(v.value.item() == 0.0 for v in metrics.values()), metrics
    assert all(float(v.weight) == 0.0 for v in metrics.values() if v.reduce == "mean")  # nothing to average
    modes = ["token-mean", "sequence-mean", "constant"]
    total = sum(aggregate(per_token, mask, mode, max_len=T)[0] for mode in modes)
    router = torch.randn(B * T, 4, requires_grad=True)
    picked = torch.tensor([[[0, 1]]] * (B * T))  # (B*T, 1 layer, top-2)
    for balance in (switch_aux_loss, sequence_aux_loss):
        aux, aux_metrics = balance((router,), picked, mask.bool())
        assert aux.item() == 0.0 and aux_metrics["moe/aux_loss"].value.item() == 0.0
        total = total + aux
    assert all(m.value == 0.0 for m in expert_load_stats(picked, mask.bool().flatten(), 4).values())
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and router.grad is not None
    assert torch.isfinite(router.grad).all()


# ------------------------------------------------------------------------------------------ MoE router

BALANCED = torch.tensor([[LN3, 0.0], [0.0, LN3]])  # probs [.75, .25], [.25, .75]; top-1 experts 0, 1
SKEWED = torch.tensor([[LN3, 0.0], [LN3, 0.0]])  # both tokens to expert 0


def top_k(*layers: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(tokens, layers, k) the experts a softmax router (Qwen3-MoE) picks from these logits."""
    return torch.stack([layer.softmax(-1).topk(k).indices for layer in layers], dim=1)


def test_switch_aux_loss_hand_values() -> None:
    loss, m = switch_aux_loss((BALANCED,), top_k(BALANCED), None)
    assert approx(loss, 2 * (0.5 * 0.5 + 0.5 * 0.5))  # f = P = [.5, .5] -> 1.0
    loss, m = switch_aux_loss((SKEWED,), top_k(SKEWED), None)
    assert approx(loss, 2 * (1.0 * 0.75 + 0.0 * 0.25))  # 1.5
    assert approx(m["moe/aux_loss"], 1.5) and m["moe/aux_loss"].weight == 2
    # Two layers: f averaged [.75, .25], P averaged [.625, .375] -> 2 (.75 * .625 + .25 * .375) = 1.125.
    assert approx(switch_aux_loss((BALANCED, SKEWED), top_k(BALANCED, SKEWED), None)[0], 1.125)
    # A padded third token routed to expert 1 is excluded: same as SKEWED alone.
    padded = torch.cat([SKEWED, torch.tensor([[0.0, 5.0]])])
    assert approx(switch_aux_loss((padded,), top_k(padded), torch.tensor([[True, True, False]]))[0], 1.5)
    # f counts the experts the tokens went to, not the softmax's choice (routing replay): SKEWED's
    # probabilities [.75, .25] with both tokens sent to expert 1 -> 2 (0 * .75 + 1 * .25) = 0.5, not 1.5.
    assert approx(switch_aux_loss((SKEWED,), torch.tensor([[[1]], [[1]]]), None)[0], 2 * 0.25)


@pytest.mark.parametrize("use_mask", [False, True])
def test_switch_aux_loss_matches_transformers(use_mask: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(2 * 5, 8, generator=gen) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]) if use_mask else None
    ours, _ = switch_aux_loss(layers, top_k(*layers, k=2), mask.bool() if use_mask else None)
    theirs = load_balancing_loss_func(layers, num_experts=8, top_k=2, attention_mask=mask)
    assert isinstance(theirs, torch.Tensor)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sequence_aux_loss_hand_values() -> None:
    """DeepSeek-V3's sequence-wise balance loss on sigmoid scores (GLM-4.5, GLM-5): per sequence
    f_i = E / (k T) * (tokens routed to i), P_i = mean over tokens of sigmoid(z_i) / sum_j sigmoid(z_j)."""
    # Sequence 0: scores [.5, .5] and [.75, .25] (normalised: the same), P = [.625, .375]; a correction
    # bias sent both tokens to expert 1, so f = [0, 2]: sum f P = .75. A softmax top-1 would pick 0 then 0.
    # Sequence 1: two tokens, scores [.5, .5], routed to 0 and 1: f = [1, 1], P = [.5, .5] -> 1.0, the
    # value at perfect balance; its third token is padding, excluded.
    z = torch.tensor([[0.0, 0.0], [LN3, -LN3], [9.0, 9.0], [0.0, 0.0], [0.0, 0.0], [5.0, -5.0]])  # (B*T, E)
    picked = torch.tensor([1, 1, 0, 0, 1, 0])[:, None, None]  # (B*T, 1 layer, top-1)
    keep = torch.tensor([[True, True, False], [True, True, False]])
    loss, m = sequence_aux_loss((z,), picked, keep)
    assert approx(loss, (0.75 + 1.0) / 2)
    assert approx(m["moe/aux_loss"], 0.875) and m["moe/aux_loss"].weight == 2  # a mean over sequences
    # Layers average: a second layer routing sequence 0 evenly too -> (1.0 + 1.0) / 2 for it.
    even = torch.tensor([0, 1, 0, 0, 1, 0])[:, None, None]
    loss2, _ = sequence_aux_loss((z, z), torch.cat([picked, even], dim=1), keep)
    assert approx(loss2, ((0.75 + 1.0) / 2 + 1.0) / 2)
    # Differentiable in the router logits: the gradient lowers the score of the overloaded expert 1.
    z = z.clone().requires_grad_()
    sequence_aux_loss((z,), picked, keep)[0].backward()
    assert z.grad is not None and z.grad[1, 1] > 0 and z.grad[2].abs().sum() == 0  # padding gets none


def test_expert_load_stats_are_the_load_of_the_experts_picked() -> None:
    # 4 experts, top-2, two layers; layer 0 spreads 3 tokens as [2, 2, 1, 1] slots, layer 1 as [3, 3, 0, 0].
    picked = torch.tensor([[[0, 1], [0, 1]], [[2, 3], [1, 0]], [[0, 1], [0, 1]], [[3, 3], [3, 3]]])
    keep = torch.tensor([True, True, True, False])  # the fourth token is padding
    m = expert_load_stats(picked, keep, num_experts=4)
    # load = slots / (tokens * k / E) = slots / 1.5
    assert approx(m["moe/expert_load_max"], 3 / 1.5) and m["moe/expert_load_max"].reduce == "max"
    assert approx(m["moe/expert_load_min"], 0.0) and m["moe/expert_load_min"].reduce == "min"
    m = expert_load_stats(picked[:, :1], keep, num_experts=4)
    assert approx(m["moe/expert_load_max"], 2 / 1.5) and approx(m["moe/expert_load_min"], 1 / 1.5)
