"""How a batch is cut into micro-batches and put back together: rows sliced, sharded over ranks,
grouped by length under a token budget (padded, or packed as one sequence of their tokens), fillers
for ranks short of a forward, and per-micro-batch results scattered back into the batch's rows.

Batches are dataclasses of tensors with the batch dimension first (`tidal.types.TokenBatch`,
`TrainBatch`); per-token fields are (B, T, ...) with the width of `input_ids`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

B = TypeVar("B")


def row_slice(batch: B, start: int, end: int) -> B:
    """Rows [start, end) of a dataclass of tensors (batch dimension first); other fields are kept."""
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}  # type: ignore[arg-type]
    return dataclasses.replace(  # type: ignore[type-var]
        batch, **{k: v[start:end] for k, v in fields.items() if isinstance(v, torch.Tensor)}
    )


def num_rows(batch: object) -> int:
    return next(
        getattr(batch, f.name).shape[0]
        for f in dataclasses.fields(batch)  # type: ignore[arg-type]
        if isinstance(getattr(batch, f.name), torch.Tensor)
    )


def micro_batches(batch: B, size: int) -> list[B]:
    """Consecutive micro-batches of `size` rows (the last may be smaller)."""
    n = num_rows(batch)
    return [row_slice(batch, i, i + size) for i in range(0, n, size)]


@dataclasses.dataclass
class Micro:
    """A micro-batch of a token-budget plan: `batch`, rows `rows` of the batch it was cut from, columns
    from `start` (all padding elsewhere in these rows); `rows` is empty for a filler (`filler`).
    `packed`: its forward runs its rows' real tokens as one sequence (`forward_hidden(packed=True)`)."""

    batch: Any
    rows: torch.Tensor
    start: int = 0
    packed: bool = False


def plan_micro_batches(batch: B, max_rows: int, max_tokens: int | None, packed: bool = False) -> list[Micro]:
    """`budget_micro_batches` under a token budget; without one, consecutive micro-batches of
    `max_rows` rows at the batch's width (`micro_batches`). `packed` needs a budget."""
    if max_tokens is not None:
        return budget_micro_batches(batch, max_rows, max_tokens, packed)
    if packed:
        raise ValueError("packed micro-batches need a token budget (trainer.max_tokens_per_micro_batch)")
    return [
        Micro(m, torch.arange(i * max_rows, i * max_rows + num_rows(m)))
        for i, m in enumerate(micro_batches(batch, max_rows))
    ]


def budget_micro_batches(batch: B, max_rows: int, max_tokens: int, packed: bool = False) -> list[Micro]:
    """Micro-batches of at most `max_rows` rows whose rows x longest row stays within `max_tokens`
    (`trainer.max_tokens_per_micro_batch`): rows sorted by length, longest first, each micro-batch
    the next rows that fit, trimmed to the columns where its rows hold a real token. A row longer
    than the budget is a micro-batch of its own. Memory then follows the tokens of the batch, not its
    rows x its longest row; the loss, summed over tokens and divided by the whole batch's count, is
    the same.

    `packed`: the budget bounds the rows' real tokens (their forward runs them as one sequence, no
    padding), and rows of any lengths share a micro-batch: each row, longest first, goes to the first
    micro-batch it fits in (first-fit decreasing), so short rows fill the room long ones leave."""
    mask = batch.attention_mask.bool()  # type: ignore[attr-defined]
    lengths = [int(n) for n in mask.sum(-1)]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    if packed:
        used: list[int] = []
        for i in order:
            fits = (k for k, g in enumerate(groups) if len(g) < max_rows and used[k] + lengths[i] <= max_tokens)
            k = next(fits, None)
            if k is None:
                groups.append([])
                used.append(0)
                k = -1
            groups[k].append(i)
            used[k] += lengths[i]
    else:
        for i in order:
            group = groups[-1] if groups else []
            if not group or len(group) == max_rows or (len(group) + 1) * lengths[group[0]] > max_tokens:
                groups.append([i])
            else:
                group.append(i)
    return [_trimmed(batch, g, packed) for g in groups]


def _trimmed(batch: B, rows: list[int], packed: bool = False) -> Micro:
    index = torch.tensor(rows)
    picked = _select(batch, index)
    real = picked.attention_mask.bool().any(0).nonzero()  # type: ignore[attr-defined]
    start, end = (int(real.min()), int(real.max()) + 1) if len(real) else (0, 1)
    return Micro(_columns(picked, start, end), index, start, packed)


def filler_micro(batch: B, packed: bool = False) -> Micro:
    """A micro-batch that adds nothing (one row, one column, no target): what a rank with fewer
    micro-batches runs so that every rank makes the same collective calls (ZeRO-3 gathers)."""
    one = _columns(_select(batch, torch.tensor([0])), 0, 1)
    nothing = dataclasses.replace(one, loss_mask=torch.zeros_like(one.loss_mask))  # type: ignore[type-var, attr-defined]
    return Micro(nothing, torch.tensor([], dtype=torch.long), packed=packed)


def scatter_rows(parts: Sequence[torch.Tensor], micros: Sequence[Micro], rows: int, width: int) -> torch.Tensor:
    """Per-micro-batch (rows, its width, ...) results back into one (rows, width, ...) tensor in the
    batch's row and column order (zeros where a micro-batch was trimmed; fillers dropped)."""
    out = parts[0].new_zeros(rows, width, *parts[0].shape[2:])
    for part, m in zip(parts, micros, strict=True):
        if len(m.rows):
            out[m.rows, m.start : m.start + part.shape[1]] = part
    return out


def _select(batch: B, index: torch.Tensor) -> B:
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}  # type: ignore[arg-type]
    return dataclasses.replace(  # type: ignore[type-var]
        batch, **{k: v[index] for k, v in fields.items() if isinstance(v, torch.Tensor)}
    )


def _columns(batch: B, start: int, end: int) -> B:
    """Columns [start, end) of every per-token field ((B, T, ...) with the width of `input_ids`)."""
    width = batch.input_ids.shape[1]  # type: ignore[attr-defined]
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}  # type: ignore[arg-type]
    return dataclasses.replace(  # type: ignore[type-var]
        batch,
        **{
            k: v[:, start:end]
            for k, v in fields.items()
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == width
        },
    )


def split_parts(batch: B, parts: int) -> list[B]:
    """`parts` consecutive pieces of (nearly) equal row counts (empty pieces are left out)."""
    n = num_rows(batch)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [row_slice(batch, bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def shard_rows(batch: B, rank: int, world_size: int) -> B:
    """Rank `rank`'s contiguous share of the rows of a global batch, ceil(n / world_size) rows on every
    rank, so that all ranks run the same number of forwards (ZeRO-3 gathers parameters in each). A
    share that runs short is filled with copies of row 0 whose `loss_mask` is 0: they add nothing to
    a loss or a gradient. Concatenating the ranks' shares in rank order gives the batch back, then
    its padding rows."""
    n = num_rows(batch)
    per_rank = -(-n // world_size)
    start = min(rank * per_rank, n)
    share = row_slice(batch, start, min(start + per_rank, n))
    short = per_rank - num_rows(share)
    if short == 0:
        return share
    filler = row_slice(batch, 0, 1)
    filler = dataclasses.replace(filler, loss_mask=torch.zeros_like(filler.loss_mask))  # type: ignore[type-var, attr-defined]
    return concat_rows([share] + [filler] * short)


def concat_rows(pieces: Sequence[B]) -> B:
    """The rows of several batches of one dataclass, in order (tensor fields concatenated)."""
    first = pieces[0]
    fields = [f.name for f in dataclasses.fields(first) if isinstance(getattr(first, f.name), torch.Tensor)]  # type: ignore[arg-type]
    return dataclasses.replace(first, **{k: torch.cat([getattr(p, k) for p in pieces]) for k in fields})  # type: ignore[type-var]


def to_device(batch: B, device: torch.device | str) -> B:
    """The batch with every tensor field on `device`."""
    fields = dataclasses.fields(batch)  # type: ignore[arg-type]
    tensors = {
        f.name: getattr(batch, f.name).to(device) for f in fields if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **tensors)  # type: ignore[type-var]
