"""Pure pieces of the rollout engine, against hand-computed values: top-k / top-p filtering, left
padding, position ids, and the train/inference log-prob mismatch metric."""

from __future__ import annotations

import pytest
import torch

from tidal.model.forward import logp_mismatch, pad, pad_tokens, positions
from tidal.rollout.engines.transformers import filter_logits

pytestmark = pytest.mark.unit

NEG = float("-inf")


def logits_of(probs: list[float]) -> torch.Tensor:
    """(1, V) logits whose softmax is `probs`."""
    return torch.tensor([probs]).log()


def kept(logits: torch.Tensor) -> list[list[bool]]:
    return torch.isfinite(logits).tolist()


def test_top_k_keeps_the_k_largest_and_masks_the_rest() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 4.0, 2.5]])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert out.tolist() == [[NEG, 3.0, 2.0, NEG], [NEG, NEG, 4.0, 2.5]]


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    out = filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=1, top_p=1.0)
    assert kept(out) == [[False, True, True, False]]


@pytest.mark.parametrize("top_k", [0, 4, 10])
def test_top_k_zero_or_at_least_vocab_is_a_no_op(top_k: int) -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(filter_logits(logits, top_k=top_k, top_p=1.0), logits)


@pytest.mark.parametrize(
    "top_p, expected",
    [
        # probs 0.5, 0.3, 0.15, 0.05: mass before each token is 0, 0.5, 0.8, 0.95.
        (0.45, [True, False, False, False]),  # the top token alone crosses 0.45
        (0.6, [True, True, False, False]),  # 0.3 crosses 0.6 and stays; the tokens after go
        (0.79, [True, True, False, False]),
        (0.81, [True, True, True, False]),  # 0.15 crosses 0.81
        (0.96, [True, True, True, True]),
    ],
)
def test_top_p_keeps_the_token_that_crosses_the_mass(top_p: float, expected: list[bool]) -> None:
    assert kept(filter_logits(logits_of([0.5, 0.3, 0.15, 0.05]), top_k=0, top_p=top_p)) == [expected]


def test_top_p_always_keeps_the_top_token() -> None:
    out = filter_logits(logits_of([0.25, 0.26, 0.24, 0.25]), top_k=0, top_p=1e-6)
    assert kept(out) == [[False, True, False, False]]


def test_top_p_one_is_a_no_op() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)


def test_top_p_masks_by_sorted_mass_in_unsorted_rows() -> None:
    # Row 0: probs 0.05, 0.5, 0.15, 0.3 (the sorted row above, shuffled); row 1: 0.1, 0.1, 0.1, 0.7.
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.1, 0.1, 0.1, 0.7]]).log()
    out = filter_logits(logits, top_k=0, top_p=0.6)
    assert kept(out) == [[False, True, False, True], [False, False, False, True]]
    # Kept logits are untouched, not renormalised.
    assert out[0, 1] == logits[0, 1] and out[1, 3] == logits[1, 3]


def test_top_p_applies_to_the_top_k_distribution_renormalised() -> None:
    # Top-2 of 0.4, 0.3, 0.2, 0.1 renormalises to 4/7, 3/7: the mass before the second token is
    # 0.571 >= 0.5, so it goes. Measured on the full distribution (0.4 < 0.5) it would stay.
    out = filter_logits(logits_of([0.4, 0.3, 0.2, 0.1]), top_k=2, top_p=0.5)
    assert kept(out) == [[True, False, False, False]]
    out = filter_logits(logits_of([0.4, 0.3, 0.2, 0.1]), top_k=2, top_p=0.6)
    assert kept(out) == [[True, True, False, False]]


def test_left_pad_ragged_rows() -> None:
    ids, mask = pad_tokens([[1, 2, 3], [4], [5, 6], []], pad_id=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_positions_start_at_zero_on_each_rows_first_real_token() -> None:
    _, mask = pad_tokens([[1, 2, 3], [4], [5, 6]], pad_id=0, side="left")
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    # Decoding appends ones to the mask; positions keep counting from each row's own start.
    grown = torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], dim=1)
    assert positions(grown)[:, -2:].tolist() == [[3, 4], [1, 2], [2, 3]]


def test_right_pad_and_values() -> None:
    ids, mask = pad_tokens([[1, 2, 3], [4], []], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert pad([[0.5], [1.5, 2.5]], -1.0, dtype=torch.float32).tolist() == [[0.5, -1.0], [1.5, 2.5]]


def test_logp_mismatch_mean_and_max_over_masked_finite_tokens() -> None:
    behavior = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("-inf"), 0.0]])
    recomputed = torch.tensor([[-1.25, -2.0, 0.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # |diffs| 0.25, 0, 0.5 over the masked tokens; the infinite one and the unmasked 3.0 count for nothing.
    out = logp_mismatch(behavior, recomputed, mask)
    assert out["logp_mismatch_mean"] == pytest.approx(0.75 / 3)
    assert out["logp_mismatch_max"] == pytest.approx(0.5)
    assert logp_mismatch(behavior, recomputed)["logp_mismatch_max"] == pytest.approx(3.0)


def test_logp_mismatch_without_tokens_is_empty() -> None:
    assert logp_mismatch(torch.zeros(2, 0), torch.zeros(2, 0)) == {}
    assert logp_mismatch(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2)) == {}
