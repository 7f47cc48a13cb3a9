from __future__ import annotations

import math

import pytest
import torch

from tidal.trainer.advantages import ESTIMATORS, compute_advantages

pytestmark = pytest.mark.unit

# Three groups of unequal sizes, interleaved, with arbitrary ids:
#   id 5: rewards 1, 2, 3 (size 3); id 0: reward 7 (size 1); id -2: rewards 0, 0, 1, 1 (size 4).
IDS = torch.tensor([5, -2, 0, 5, -2, -2, 5, -2])
REWARDS = torch.tensor([1.0, 0.0, 7.0, 2.0, 0.0, 1.0, 3.0, 1.0])


def test_grpo_normalises_per_group_with_unequal_sizes() -> None:
    adv, _ = compute_advantages(REWARDS, IDS, "grpo")
    # id 5: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1.
    # id -2: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 1/sqrt(3), so +-0.5 * sqrt(3) = +-0.8660254.
    # id 0: a single sample carries no signal: 0 (a batch-wide normalisation would give it a large value).
    expected = [-1.0, -0.8660254, 0.0, 0.0, -0.8660254, 0.8660254, 1.0, 0.8660254]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    assert adv[2].item() == 0.0


def test_grpo_zero_variance_group_is_exactly_zero() -> None:
    rewards = torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0])
    ids = torch.tensor([1, 1, 1, 2, 2])
    adv, _ = compute_advantages(rewards, ids, "grpo")
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    # id 2: mean 0.5, Bessel std sqrt(0.5) = 0.7071068 -> +-0.5 / 0.7071068 = +-0.7071068.
    assert adv[3:].tolist() == pytest.approx([0.7071068, -0.7071068], abs=1e-5)


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_degenerate_batches_give_zero_not_nan(estimator: str) -> None:
    single, _ = compute_advantages(torch.tensor([4.0]), torch.tensor([3]), estimator)
    assert single.tolist() == [0.0]
    flat, metrics = compute_advantages(torch.tensor([0.1, 0.1, 0.1, 0.1]), torch.tensor([0, 0, 1, 1]), estimator)
    assert flat.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert all(v.value == 0.0 for v in metrics.values())


def test_drgrpo_subtracts_group_mean_only() -> None:
    adv, metrics = compute_advantages(REWARDS, IDS, "drgrpo")
    expected = [-1.0, -0.5, 0.0, 0.0, -0.5, 0.5, 1.0, 0.5]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # Metrics: mean 0; |A| mean (1 + .5 + 0 + 0 + .5 + .5 + 1 + .5) / 8 = 0.5; Bessel std sqrt(3 / 7).
    assert metrics["train/advantage_mean"].value == pytest.approx(0.0, abs=1e-7)
    assert metrics["train/advantage_abs_mean"].value == pytest.approx(0.5)
    assert metrics["train/advantage_std"].value == pytest.approx(math.sqrt(3 / 7), rel=1e-5)


def test_rloo_uses_leave_one_out_mean() -> None:
    adv, _ = compute_advantages(REWARDS, IDS, "rloo")
    # id 5: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5.
    # id -2: 0 - (0+1+1)/3 = -2/3, 1 - (0+0+1)/3 = 2/3.   id 0 (alone): 0.
    expected = [-1.5, -2 / 3, 0.0, 0.0, -2 / 3, 2 / 3, 1.5, 2 / 3]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_reinforce_pp_group_baseline_then_token_whitening() -> None:
    """OpenRLHF's reinforce_baseline: every valid token carries its sample's a_i, whitened over all
    valid tokens with the population variance (not per sample, not with Bessel's correction)."""
    rewards = torch.tensor([1.0, 3.0, 5.0, 2.0, 2.0, 8.0])
    ids = torch.tensor([1, 1, 2, 3, 3, 3])
    counts = torch.tensor([2.0, 1.0, 3.0, 1.0, 1.0, 2.0])
    adv, _ = compute_advantages(rewards, ids, "reinforce_pp", token_counts=counts)
    # Group baselines: id 1 mean 2 -> -1, 1; id 2 alone -> 0; id 3 mean 4 -> -2, -2, 4.
    # Over the 10 tokens: mean 3 / 10 = 0.3, variance (2 * 1.69 + 0.49 + 3 * 0.09 + 5.29 + 5.29 +
    # 2 * 13.69) / 10 = 4.21.
    expected = [(a - 0.3) / 4.21**0.5 for a in (-1.0, 1.0, 0.0, -2.0, -2.0, 4.0)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # The same from the formula on the tokens themselves.
    a = [-1.0, 1.0, 0.0, -2.0, -2.0, 4.0]
    tokens = torch.cat([torch.full((int(n),), x) for x, n in zip(a, counts, strict=True)])
    whitened = (tokens - tokens.mean()) / tokens.var(unbiased=False).sqrt()
    assert torch.cat([adv[i].repeat(int(n)) for i, n in enumerate(counts)]).tolist() == pytest.approx(
        whitened.tolist(), abs=1e-6
    )
    # One token each: population std sqrt(26 / 6), where the old per-sample Bessel std was sqrt(5.2).
    even, _ = compute_advantages(rewards, ids, "reinforce_pp")
    assert even[0].item() == pytest.approx(-1 / (26 / 6) ** 0.5, abs=1e-6)
    flat, _ = compute_advantages(torch.tensor([1.0, 1.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1]), "reinforce_pp")
    assert flat.tolist() == [0.0, 0.0, 0.0, 0.0]  # no signal: exactly 0, never 0 / 0


def test_unknown_estimator_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="grpo.*reinforce_pp|drgrpo"):
        compute_advantages(REWARDS, IDS, "ppo")


def test_an_episode_split_into_samples_counts_once_in_its_group() -> None:
    """An agent episode split into two samples (`episode` shared) weighs as one episode: its reward
    once in the group's mean and std, each of its samples with the episode's advantage."""
    from tidal.trainer.rl import episode_advantages
    from tidal.types import TrainSample

    def s(reward: float, episode: int, tokens: int = 2) -> TrainSample:
        return TrainSample(
            0, [1], [2] * tokens, [1] * tokens, [0.0] * tokens, "stop", 0, [0] * tokens, reward, False, None, episode
        )

    split = [s(1.0, 0), s(1.0, 0), s(0.0, 1), s(0.0, 2)]
    adv, _ = episode_advantages(split, "grpo")
    whole, _ = compute_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3, dtype=torch.long), "grpo")
    torch.testing.assert_close(adv, whole[[0, 0, 1, 2]])
    # Counted per sample instead, the split episode would pull the group mean to 0.5.
    assert (
        adv[2] != compute_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), "grpo")[0][2]
    )
    # Samples of their own (episode -1) are each an episode, as before.
    alone = [s(1.0, -1), s(1.0, -1), s(0.0, -1), s(0.0, -1)]
    torch.testing.assert_close(
        episode_advantages(alone, "rloo")[0],
        compute_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), "rloo")[0],
    )
