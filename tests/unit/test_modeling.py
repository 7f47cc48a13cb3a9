"""The shared model math: chunked log-probs and entropy equal the whole-tensor formulas in value and
gradient, also when computed from hidden states through the output layer; micro-batch splitting keeps
rows whole."""

from __future__ import annotations

import pytest
import torch

import tidal.model.forward as modeling
from tidal.model.batching import (
    budget_micro_batches,
    filler_micro,
    micro_batches,
    plan_micro_batches,
    scatter_rows,
    split_parts,
)
from tidal.model.forward import Hidden, entropy, head_token_stats, token_logprobs
from tidal.types import TokenBatch, TrainBatch

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


@pytest.mark.parametrize("chunk_bytes", [4 * 7 * 3, modeling.CHUNK_BYTES])
@pytest.mark.parametrize("mode", ["none", "metric", "grad"])
def test_log_probs_from_hidden_states_match_the_whole_logits(
    monkeypatch: pytest.MonkeyPatch, chunk_bytes: int, mode: str
) -> None:
    """`head_token_stats` (the output layer applied a few tokens at a time) gives the values and the
    gradients, to the hidden states and to the output layer, of the formulas on whole logits; the
    entropy has a gradient only when asked for one."""
    monkeypatch.setattr(modeling, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(5, 7, bias=False)
    torch.nn.init.normal_(head.weight, std=2.0, generator=g)
    states = torch.randn(3, 9, 5, generator=g, requires_grad=True)
    ids = torch.randint(0, 7, (3, 9), generator=g)
    weights = torch.randn(3, 9, generator=g)
    logits = head(states)
    ref_lp, ref_h = reference(logits, ids, 0.7)
    lp, h = head_token_stats(Hidden(states, head, ()), ids, 0.7, entropy=mode)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    if mode == "none":
        assert h is None
    else:
        assert h is not None and h.requires_grad == (mode == "grad")
        torch.testing.assert_close(h.double(), ref_h, atol=1e-5, rtol=0)
    objective = lp + h if mode == "grad" else lp
    ref_objective = ref_lp + ref_h if mode == "grad" else ref_lp
    grads = torch.autograd.grad((objective * weights).sum(), [states, head.weight])
    ref_grads = torch.autograd.grad((ref_objective * weights.double()).sum(), [states, head.weight])
    for grad, ref_grad in zip(grads, ref_grads, strict=True):  # fp32 against fp64: relative 2e-6 seen
        torch.testing.assert_close(grad.double(), ref_grad.double(), atol=1e-5, rtol=1e-5)


def test_a_capped_head_is_capped_and_an_empty_input_stays_on_the_graph() -> None:
    """Soft-capped logits (Gemma's `final_logit_softcapping`) are capped before the softmax; a
    micro-batch of one column (a filler) gives an empty result that still has a gradient path."""
    head = torch.nn.Linear(2, 3, bias=False)
    states = torch.randn(1, 4, 2) * 50
    ids = torch.randint(0, 3, (1, 4))
    lp, _ = head_token_stats(Hidden(states, head, (), softcap=5.0), ids)
    torch.testing.assert_close(lp, token_logprobs(torch.tanh(head(states) / 5.0) * 5.0, ids))
    one = torch.randn(1, 1, 2, requires_grad=True)
    lp, h = head_token_stats(Hidden(one, head, ()), torch.zeros(1, 1, dtype=torch.long), entropy="metric")
    assert lp.shape == (1, 1) and h is not None and h.shape == (1, 1) and lp.requires_grad
    lp.sum().backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) == 0.0


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


def uneven_batch(lengths: list[int], width: int, left: bool = False) -> TrainBatch:
    """Rows of the given real lengths (right-padded, or left-padded), tokens numbered by row and
    column so that any row or column moved shows; per-token fields and a routing of their own."""
    rows = len(lengths)
    ids = torch.arange(rows * width).view(rows, width) + 10
    attn = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        attn[i, width - n :] = 1 if left else 0
        if not left:
            attn[i, :n] = 1
    mask = attn.clone()
    mask[:, 0] = 0
    per_token = ids.float() * attn
    routing = torch.stack([ids, ids + 1], dim=-1)[:, :, None, :].expand(rows, width, 3, 2).to(torch.int64)
    return TrainBatch(ids, attn, mask, logp_mu=per_token, advantages=per_token, versions=attn, routing=routing)


@pytest.mark.parametrize("left", [False, True])
def test_token_budget_micro_batches_hold_each_row_once_within_the_budget(left: bool) -> None:

    lengths = [3, 40, 5, 3, 12, 2, 3, 7]
    batch = uneven_batch(lengths, 40, left)
    plan = budget_micro_batches(batch, max_rows=4, max_tokens=24)
    assert sorted(int(i) for m in plan for i in m.rows) == list(range(len(lengths)))  # each row once
    for m in plan:
        rows, width = m.batch.input_ids.shape
        longest = max(lengths[int(i)] for i in m.rows)
        assert width == longest  # trimmed to its own longest row
        assert rows <= 4 and (rows * width <= 24 or rows == 1)  # the 40-token row alone
        assert [lengths[int(i)] for i in m.rows] == sorted((lengths[int(i)] for i in m.rows), reverse=True)
        for name in ("attention_mask", "loss_mask", "logp_mu", "advantages", "versions"):
            assert getattr(m.batch, name).shape == (rows, width), name
        assert m.batch.routing.shape == (rows, width, 3, 2)
    # Longest first, packed greedily: rows x width 40, 24, 20 and 2: the plan holds the batch's 75
    # tokens in 86 cells, against 8 x 40 = 320 at the batch's width.
    assert [[lengths[int(i)] for i in m.rows] for m in plan] == [[40], [12, 7], [5, 3, 3, 3], [2]]
    # Put back, every field is the batch's at its real tokens.
    real = batch.attention_mask.bool()
    for name in ("input_ids", "logp_mu", "loss_mask"):
        back = scatter_rows([getattr(m.batch, name) for m in plan], plan, *batch.input_ids.shape)
        assert torch.equal(back[real], getattr(batch, name)[real]), name
    routing = scatter_rows([m.batch.routing for m in plan], plan, *batch.input_ids.shape)
    assert torch.equal(routing[real], batch.routing[real])


def test_a_filler_micro_batch_adds_nothing_and_is_dropped_when_put_back() -> None:

    batch = uneven_batch([4, 2], 6)
    filler = filler_micro(batch)
    assert filler.batch.input_ids.shape == (1, 1) and int(filler.batch.loss_mask.sum()) == 0
    plan = [*budget_micro_batches(batch, max_rows=8, max_tokens=64), filler]
    back = scatter_rows([m.batch.logp_mu for m in plan], plan, 2, 6)
    assert torch.equal(back, batch.logp_mu)


def test_completion_logprobs_of_uneven_rows_match_one_row_at_a_time() -> None:
    """Teacher-forced log-probs of rows of very different lengths, micro-batched by length under a
    token budget, equal each row's alone (no padding)."""
    from tidal.model.forward import completion_logprobs
    from tidal.model.loading import load_model, materialize_preset

    model = load_model(materialize_preset("tiny-qwen3-moe")).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 60, (n,), generator=g).tolist() for n in (3, 7, 4, 5)]
    completions = [torch.randint(5, 60, (n,), generator=g).tolist() for n in (40, 2, 9, 1)]
    together = completion_logprobs(model, prompts, completions, pad_id=0, max_tokens=48)
    for p, c, got in zip(prompts, completions, together, strict=True):
        (alone,) = completion_logprobs(model, [p], [c], pad_id=0)
        assert got.shape == (len(c),)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_packed_micro_batches_bound_the_real_tokens() -> None:
    """Packed, the budget counts the rows' real tokens (they run as one sequence), and each row,
    longest first, joins the first micro-batch it fits: short rows fill the room beside long ones."""
    lengths = [3, 40, 5, 3, 12, 2, 3, 7]
    batch = uneven_batch(lengths, 40)
    plan = budget_micro_batches(batch, max_rows=4, max_tokens=48, packed=True)
    assert all(m.packed for m in plan)
    assert sorted(int(i) for m in plan for i in m.rows) == list(range(len(lengths)))
    assert [[lengths[int(i)] for i in m.rows] for m in plan] == [[40, 7], [12, 5, 3, 3], [3, 2]]
    for m in plan:
        assert len(m.rows) <= 4 and sum(lengths[int(i)] for i in m.rows) <= 48
    # Padded, the same budget holds [40], [12, 7, 5, 3] (48 cells for 27 tokens) and [3, 3, 2].
    padded = budget_micro_batches(batch, max_rows=4, max_tokens=48)
    assert [[lengths[int(i)] for i in m.rows] for m in padded] == [[40], [12, 7, 5, 3], [3, 3, 2]]
    assert not any(m.packed for m in padded)
    assert filler_micro(batch, packed=True).packed
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        plan_micro_batches(batch, 4, None, packed=True)


@pytest.mark.parametrize(
    ("preset", "attn"),
    [("tiny-qwen3-moe", "sdpa"), ("tiny-qwen3-moe", "eager"), ("tiny-glm4-moe", "sdpa"), ("tiny-glm5-moe", None)],
)
@pytest.mark.parametrize("left", [False, True])
def test_a_packed_forward_gives_each_row_what_its_padded_forward_gives(
    preset: str, attn: str | None, left: bool
) -> None:
    """Rows of 2 to 30 tokens run as one packed sequence (position ids from 0 per row, no attention
    mask) give the padded forward's log-probs, entropies and router logits at every real token: no
    token attends across rows. The gradient to the hidden states' producer agrees too."""
    from tidal.model.forward import forward_hidden
    from tidal.model.loading import load_model, materialize_preset

    model = load_model(materialize_preset(preset), attn_implementation=attn).eval()
    lengths = [30, 2, 17, 9, 5]
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(len(lengths), 30, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(30 - n, 30) if left else slice(0, n)
        ids[i, cols] = torch.randint(5, 60, (n,), generator=g)
        mask[i, cols] = 1
    targets = mask.bool() & torch.roll(mask.bool(), 1, 1)  # a real token after a real token of its row
    targets[:, 0] = False
    weights = torch.randn(ids.shape, generator=g) * targets
    got = {}
    for packed in (False, True):
        model.zero_grad()
        hidden = forward_hidden(model, ids, mask, router_logits=True, packed=packed)
        logp, h = head_token_stats(hidden, ids, 0.8, entropy="grad")
        assert h is not None
        ((logp + h) * weights).sum().backward()
        grad = model.get_input_embeddings().weight.grad.clone()
        router = torch.stack(hidden.router)[:, mask.flatten().bool()]  # (layers, real tokens, experts)
        got[packed] = (logp[targets], h[targets], router, grad)
        if packed:
            assert hidden.states.shape[:2] == (1, sum(lengths))  # one sequence of the real tokens
            assert (logp[~targets] == 0).all()
    for name, a, b in zip(("logp", "entropy", "router", "embedding grad"), got[False], got[True], strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)
