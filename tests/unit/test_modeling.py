"""The shared model math: chunked log-probs and entropy equal the whole-tensor formulas in value and
gradient, micro-batch splitting keeps rows whole."""

from __future__ import annotations

import pytest
import torch

import tidal.model.forward as modeling
from tidal.model.forward import entropy, micro_batches, split_parts, token_logprobs
from tidal.types import TokenBatch

pytestmark = pytest.mark.unit


def reference(logits: torch.Tensor, ids: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp = (logits[:, :-1].double() / tau).log_softmax(-1)  # (B, T-1, V)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    h = -(logp.exp() * logp).sum(-1)
    pad = torch.zeros(logits.shape[0], 1, dtype=torch.float64)
    return torch.cat([pad, picked], 1), torch.cat([pad, h], 1)


@pytest.mark.parametrize("chunk_bytes", [4 * 7 * 3, modeling.CHUNK_BYTES])  # 3 positions per block, or all
def test_chunked_logprobs_and_entropy_match_the_formula(monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    monkeypatch.setattr(modeling, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 11, 7, generator=g)).requires_grad_(True)  # (B, T, V)
    ids = torch.randint(0, 7, (2, 11), generator=g)
    weights = torch.randn(2, 11, generator=g)
    ref_lp, ref_h = reference(logits, ids, 0.7)
    lp, h = token_logprobs(logits, ids, 0.7), entropy(logits, 0.7)
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == h.shape == (2, 11)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(h.double(), ref_h, atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(((lp + h) * weights).sum(), logits)
    (ref_grad,) = torch.autograd.grad(((ref_lp + ref_h) * weights.double()).sum(), logits)
    torch.testing.assert_close(grad.double(), ref_grad.double(), atol=1e-5, rtol=0)
    assert grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_logprobs_without_grad_keep_no_graph() -> None:
    logits = torch.randn(1, 5, 4, requires_grad=True)
    with torch.no_grad():
        assert not token_logprobs(logits, torch.zeros(1, 5, dtype=torch.long)).requires_grad


def test_micro_batches_and_parts_keep_rows_whole() -> None:
    ids = torch.arange(5)[:, None].repeat(1, 3)
    batch = TokenBatch(ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert [m.input_ids[:, 0].tolist() for m in micro_batches(batch, 2)] == [[0, 1], [2, 3], [4]]
    assert [p.input_ids[:, 0].tolist() for p in split_parts(batch, 2)] == [[0, 1], [2, 3, 4]]
    assert [p.input_ids[:, 0].tolist() for p in split_parts(batch, 7)] == [[0], [1], [2], [3], [4]]
