"""The model math every stage shares: padding, position ids, the forward pass, token log-probs,
entropy and the train / inference log-prob mismatch (micro-batches: `tidal.model.batching`).

Rollout (evaluation's teacher-forced check), SFT and the RL trainer all call these; a second copy
of any of them is a bug waiting to diverge. Per-token tensors are (B, T) and aligned with the token
at position t, predicted from the logits at t - 1, so position 0 is never a target and holds 0.

The trainer's log-probs and entropy come from the final hidden states (`forward_hidden`) through the
output layer a chunk of tokens at a time (`head_token_stats`: `CHUNK_BYTES` of fp32 logits at once),
so no (B, T, V) tensor is ever built, in any dtype (a 150k vocabulary at 16k tokens is 10 GB a row in
fp32); with grad, each chunk's logits are recomputed in the backward pass instead of kept. `forward`
and `token_logprobs` / `entropy` on whole logits stay as the reference they are tested against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tidal.model.batching import Micro, plan_micro_batches, scatter_rows
from tidal.types import TokenBatch

Side = Literal["left", "right"]

CHUNK_BYTES = 64 * 2**20
"""Largest block of fp32 logits that log-prob and entropy computations hold at once."""


# ------------------------------------------------------------------------------------------- padding


def pad(
    rows: Sequence[Sequence[float]], value: float = 0, side: Side = "right", dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """(B, T) tensor of ragged rows padded with `value` on the `side` to the longest row."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            out[i, cols] = torch.as_tensor(r, dtype=dtype)
    return out


def pad_tokens(
    seqs: Sequence[Sequence[int]], pad_id: int, side: Side = "right", device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on the `side`."""
    ids = pad(seqs, pad_id, side)
    mask = pad([[1] * len(s) for s in seqs], 0, side)
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------ forward


def forward(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, router_logits: bool = False
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(logits (B, T, V), router logits per MoE layer or ()) of a causal LM (a HF model or a
    DeepSpeed engine around one), with position ids that skip each row's padding."""
    out = _call(model, input_ids, attention_mask, router_logits)
    return out.logits, tuple(getattr(out, "router_logits", None) or ())


def _call(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    router_logits: bool,
    packed: torch.Tensor | None = None,
    **extra: Any,
) -> Any:
    """The model's output for a padded batch: position ids that skip each row's padding, no cache.
    `packed`: the places of the real tokens in the flattened batch, run as one sequence (1, N) without
    an attention mask (`forward_hidden`)."""
    kwargs = {"output_router_logits": True} if router_logits else {}
    ids, mask, pos = input_ids, attention_mask, positions(attention_mask)
    if packed is not None:
        ids, mask, pos = ids.flatten()[packed][None], None, pos.flatten()[packed][None]
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs, **extra)


@dataclasses.dataclass
class Hidden:
    """A forward pass stopped before the output layer: the final (normed) hidden states (B, T, H),
    the output layer that turns them into logits, and the router logits per MoE layer (or ()),
    (B * T, E) each. Packed (`index` set): the states are (1, N, H), the batch's N real tokens in
    row-major order, the i-th at place `index[i]` of the flattened (B, T) batch of `slots` places; the
    router logits are put back at (B * T, E), 0 at padding."""

    states: torch.Tensor
    head: torch.nn.Module
    router: tuple[torch.Tensor, ...]
    softcap: float | None = None
    """The model's `final_logit_softcapping` (Gemma-style tanh capping of the logits), if any."""
    index: torch.Tensor | None = None
    slots: int = 0

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token values of a packed forward, (N, ...) in its token order, as (B * T, ...): 0 at padding."""
        if self.index is None:
            return x
        return x.new_zeros(self.slots, *x.shape[1:]).index_copy(0, self.index.to(x.device), x)


def forward_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    router_logits: bool = False,
    packed: bool = False,
) -> Hidden:
    """`forward`, without its (B, T, V) logits: the model (or the DeepSpeed engine around one) runs
    whole, so that engine hooks (ZeRO-3 gathers, routing replay) see the call they expect, asked for
    the logits of the last position only, and its decoder's output is taken on the way.

    `packed`: the rows' real tokens run as one sequence (1, N), no padding, each row's position ids
    from 0 and no attention mask: transformers then keeps attention within each row (a block-diagonal
    causal mask for sdpa and eager, flash-attention's varlen kernel for flash_attention_2), so every
    token sees what it sees padded, and the compute is the tokens', not rows x the longest row's.
    Rows must hold their real tokens contiguously (padding on one side)."""
    lm = getattr(model, "module", model)
    seen: list[torch.Tensor] = []

    def take(_module: torch.nn.Module, _args: Any, out: Any) -> None:
        seen.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    index = attention_mask.flatten().nonzero().squeeze(-1) if packed else None
    hook = lm.get_decoder().register_forward_hook(take)
    try:
        out = _call(model, input_ids, attention_mask, router_logits, index, logits_to_keep=1)
    finally:
        hook.remove()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    hidden = Hidden(seen[-1], lm.get_output_embeddings(), (), softcap, index, attention_mask.numel())
    hidden.router = tuple(hidden.unpack(z) for z in getattr(out, "router_logits", None) or ())
    return hidden


def effective_temperature(temperature: float) -> float:
    # Greedy decoding (temperature 0) samples from the argmax; its log-probs are scored at temperature 1.
    return temperature if temperature > 0 else 1.0


def _chunked(fn: Callable[..., torch.Tensor], logits: torch.Tensor, *per_token: torch.Tensor) -> torch.Tensor:
    """(B, T) with column 0 = 0 and column t = fn(logits[:, t - 1], per_token[:, t]) for t >= 1,
    computed over blocks of at most CHUNK_BYTES of fp32 logits (recomputed in backward under grad)."""
    b, t, v = logits.shape
    if b * max(t - 1, 0) * v * 4 <= CHUNK_BYTES:  # small enough to take whole, no recompute needed
        return F.pad(fn(logits[:, :-1], *(x[:, 1:] for x in per_token)), (1, 0))
    step = max(1, CHUNK_BYTES // (4 * v))
    grad = torch.is_grad_enabled() and logits.requires_grad
    rows = []
    for i in range(b):
        z, extra = logits[i, :-1], [x[i, 1:] for x in per_token]  # (T-1, V) contiguous views
        parts = []
        for s in range(0, t - 1, step):
            args = (z[s : s + step], *(x[s : s + step] for x in extra))
            parts.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
        rows.append(torch.cat(parts) if parts else z.new_zeros(0, dtype=torch.float32))
    return F.pad(torch.stack(rows), (1, 0))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(x_t | x_<t) of the tokens in `input_ids` (B, T) under `logits` (B, T, V) / temperature.

    out[:, t] = log_softmax(logits[:, t - 1] / temperature)[input_ids[:, t]], out[:, 0] = 0: the
    gathered logit minus logsumexp, in fp32, without a full log-softmax.
    """
    tau = effective_temperature(temperature)

    def fn(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        z = z.float() / tau  # (..., V)
        return z.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(z, dim=-1)

    return _chunked(fn, logits, input_ids)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H_t = -sum_v p_v log p_v of the distribution predicting token t, (B, T); H[:, 0] = 0.

    p = softmax(logits[:, t - 1] / temperature), in fp32 as logsumexp(z) - sum_v p_v z_v (logits
    must be finite). Differentiable, for the entropy bonus.
    """
    tau = effective_temperature(temperature)

    def fn(z: torch.Tensor) -> torch.Tensor:
        z = z.float() / tau  # (..., V)
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)

    return _chunked(fn, logits)


EntropyMode = Literal["none", "metric", "grad"]


def head_token_stats(
    hidden: Hidden, input_ids: torch.Tensor, temperature: float = 1.0, entropy: EntropyMode = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropy or None), each (B, T) and aligned as `token_logprobs` and `entropy`, from
    the hidden states through the output layer, `CHUNK_BYTES` of fp32 logits at a time: no (B, T, V)
    tensor exists. The entropy is left out ("none"), computed without grad ("metric"), or with it
    ("grad", for an entropy bonus). Under grad each chunk is recomputed in the backward pass. A
    packed `hidden` computes them for the real tokens that have a real token of their row before them
    only, 0 elsewhere.

    The output layer is called once, its forward swapped for the chunked computation: a ZeRO-3
    engine gathers its weight once for the forward and once for the backward, where the chunks are
    recomputed, and every rank makes the same collective calls however many tokens it holds."""
    b, t = input_ids.shape
    width = hidden.states.shape[-1]
    if hidden.index is None:
        # (B * (T - 1), H) and (B * (T - 1),): token i predicts target i.
        states, targets = hidden.states[:, :-1].reshape(-1, width), input_ids[:, 1:].reshape(-1)
    else:
        # The packed tokens whose next token is of the same row predict it.
        row = hidden.index // t  # (N,): each packed token's row
        same = row[1:] == row[:-1]
        where = hidden.index[1:][same]  # the targets' places in (B * T)
        states, targets = hidden.states[0, :-1][same], input_ids.flatten()[where]
    head = hidden.head
    head.forward = functools.partial(  # type: ignore[method-assign]
        _chunked_head_stats, head, tau=effective_temperature(temperature), entropy=entropy, softcap=hidden.softcap
    )
    try:
        stats = head(states, targets)
    finally:
        del head.forward
    if hidden.index is None:
        stats = F.pad(stats.view(len(stats), b, max(t - 1, 0)), (1, 0))  # (1 or 2, B, T)
    else:  # back to the targets' places in (B, T)
        stats = stats.new_zeros(len(stats), b * t).index_copy(1, where, stats).view(len(stats), b, t)
    if entropy == "none":
        return stats[0], None
    return stats[0], (stats[1] if entropy == "grad" else stats[1].detach())


def _chunked_head_stats(
    head: torch.nn.Module,
    h: torch.Tensor,
    targets: torch.Tensor,
    tau: float,
    entropy: EntropyMode,
    softcap: float | None,
) -> torch.Tensor:
    """The output layer's forward while `head_token_stats` calls it: (1 or 2, N) log-probs (and
    entropies) of `targets` (N,) under logits of `h` (N, H), a chunk of tokens at a time."""
    weight, bias = head.weight, getattr(head, "bias", None)

    def fn(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        z = F.linear(h, weight, bias)
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        z = z.float() / tau  # (n, V): the only logits alive
        lse = torch.logsumexp(z, dim=-1)
        logp = z.gather(-1, ids[:, None]).squeeze(-1) - lse
        if entropy == "none":
            return logp[None]
        if entropy == "metric":
            z, lse = z.detach(), lse.detach()
        return torch.stack([logp, lse - (torch.softmax(z, dim=-1) * z).sum(-1)])

    step = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    # An empty input still makes one (empty) chunk: its result hangs on the graph like any other.
    parts = [
        checkpoint(fn, h[s : s + step], targets[s : s + step], use_reentrant=False)
        if grad
        else fn(h[s : s + step], targets[s : s + step])
        for s in range(0, max(len(h), 1), step)
    ]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def batch_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float,
    micro_batch_size: int,
    around: Callable[[Any], AbstractContextManager[Any]] | None = None,
    plan: list[Micro] | None = None,
) -> torch.Tensor:
    """(B, T) log-probs of the batch's tokens under `model` at `temperature`, micro-batch by
    micro-batch (of `micro_batch_size` rows, or the micro-batches `plan` of the batch, as
    `DeepSpeedTrainer.plan` makes them), on the CPU; `around(micro)`, when given, is entered around
    each micro-batch's forward (routing replay)."""
    device = next(model.parameters()).device
    plan = plan if plan is not None else plan_micro_batches(batch, micro_batch_size, None)
    parts = []
    for m in plan:
        micro = m.batch
        with around(micro) if around is not None else contextlib.nullcontext():
            hidden = forward_hidden(model, micro.input_ids.to(device), micro.attention_mask.to(device), packed=m.packed)
        parts.append(head_token_stats(hidden, micro.input_ids.to(device), temperature)[0].cpu())
    return scatter_rows(parts, plan, *batch.input_ids.shape)


def completion_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    temperature: float = 1.0,
    micro_batch_size: int = 64,
    max_tokens: int = 16384,
) -> list[torch.Tensor]:
    """Teacher-forced log-probs of each completion's tokens after its prompt (one tensor per row),
    in micro-batches of rows of like length within `max_tokens` (rows x their longest): padding every
    row to the longest of all made a held-out set of long-tailed answers cost 20x its tokens."""
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    ids, mask = pad_tokens(seqs, pad_id)
    batch = TokenBatch(ids, mask, mask)
    plan = plan_micro_batches(batch, micro_batch_size, max_tokens)
    logp = batch_logprobs(model, batch, temperature, micro_batch_size, plan=plan)
    return [logp[i, len(p) : len(p) + len(c)] for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]


# ---------------------------------------------------------------------------------------- mismatch


def logp_mismatch(
    behavior: torch.Tensor, recomputed: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Train / inference mismatch: mean and max of |behavior - recomputed| log-prob over the tokens
    where `mask` is set (all tokens without one) and the difference is finite; {} without any."""
    diff = (behavior.float() - recomputed.float()).abs()
    valid = torch.isfinite(diff) if mask is None else mask.bool() & torch.isfinite(diff)
    diff = diff[valid]
    if diff.numel() == 0:
        return {}
    return {"logp_mismatch_mean": float(diff.mean()), "logp_mismatch_max": float(diff.max())}
