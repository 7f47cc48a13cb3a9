"""Batched generation with transformers: left padding, KV cache, temperature / top-p / top-k, stops.

Our own decode loop rather than `model.generate`, because RL needs what generate hides or
processes away: the behavior log-prob of each sampled token under logits / temperature taken from
the raw logits, per-row finish reasons, and (later) a chunk boundary where new weights can be
swapped in between tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicIndexedLayer, DynamicLayer

from tidal.model.forward import pad_tokens, positions
from tidal.model.lora import is_adapter, is_lora
from tidal.model.routing import RoutingRecorder
from tidal.rollout.engines.base import Admit, row_limits
from tidal.types import Completion, SamplingParams
from tidal.weight_sync import Weights, as_buckets


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k set and outside the top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class TransformersEngine:
    """Generates completions for batches of tokenized prompts with a transformers causal LM."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, version: int = 0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.version = version
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def weight_names(self) -> set[str]:
        """What a published snapshot holds: the state dict, or a LoRA model's adapters alone."""
        names = set(self.model.state_dict())
        return {n for n in names if is_adapter(n)} if is_lora(self.model) else names

    def load_weights(self, weights: Weights, version: int) -> None:
        dtype = next(self.model.parameters()).dtype
        for bucket in as_buckets(weights):
            self.model.load_state_dict({k: v.to(dtype) for k, v in bucket.items()}, strict=False)
        self.version = version

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_chunk: Callable[[], None] | None = None,
        chunk_tokens: int = 8,
        max_tokens: list[int] | None = None,
        on_finish: Callable[[int, Completion], None] | None = None,
        admit: Admit | None = None,
        record_routing: bool = False,
    ) -> list[Completion]:
        """One completion per prompt (repeat a prompt to get a group). Row i stops with finish reason
        "length" at `max_tokens[i]` new tokens (`params.max_new_tokens` for every row when None);
        decoding goes on until every row has stopped, and stopped rows leave the running batch.

        `on_chunk`, when given, is called every `chunk_tokens` decode steps while rows are still
        generating; it may load new weights and bump `self.version` (interruptible generation). The
        KV cache of the tokens so far is kept, as PipelineRL does: each later token is sampled from
        the new weights over that cache, and its behavior log-prob and version (`Completion.versions`)
        record exactly the distribution it was sampled from. `on_finish(i, completion)` is called the
        step row i stops. `admit(running)` (continuous batching) is called at the same boundaries
        with the number of rows running and returns new (prompt, max tokens) rows to join the batch:
        they are prefilled and merged into its KV cache, numbered after the rows so far.
        `record_routing` fills each completion's `routing` with the experts its tokens were routed
        to in every MoE layer, as generation routed them (`tidal.model.routing`).
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token (e.g. a BOS token)")
        limits = row_limits(len(prompts), params, max_tokens)
        gen = torch.Generator(device=self.device)
        # An unseeded call seeds only its own generator, never torch's global one.
        gen.manual_seed(params.seed) if params.seed is not None else gen.seed()
        rows = _Rows(self, params, gen, self._stop_ids(params), on_finish)
        with RoutingRecorder(self.model) if record_routing else contextlib.nullcontext() as recorder:
            rows.recorder = recorder
            return self._decode_loop(rows, prompts, limits, on_chunk, chunk_tokens, admit)

    def _decode_loop(
        self,
        rows: _Rows,
        prompts: list[list[int]],
        limits: list[int],
        on_chunk: Callable[[], None] | None,
        chunk_tokens: int,
        admit: Admit | None,
    ) -> list[Completion]:
        """`generate`'s loop: sample, call the chunk hook, admit new rows, decode."""
        batch: _Batch | None = rows.start(prompts, limits)
        if admit is not None and not batch.mergeable():  # type: ignore[union-attr]
            admit = None  # a cache layer type (sliding window, quantized) rows cannot join
        step = 0
        while batch is not None:
            batch = batch.sample(rows)
            step += 1
            at_boundary = step % chunk_tokens == 0
            if at_boundary and batch is not None and on_chunk is not None:
                on_chunk()
            if admit is not None and (at_boundary or batch is None):
                new = admit(0 if batch is None else batch.running)
                joined = rows.start([p for p, _ in new], [n for _, n in new]).sample(rows) if new else None
                if joined is not None:
                    batch = joined if batch is None else batch.merge(joined)
            if batch is not None:
                batch.decode(self.model, rows)
        return [rows.completion(i) for i in range(len(rows.prompts))]

    def _completion(
        self,
        prompt: list[int],
        tokens: list[int],
        logps: list[float],
        finish: str | None,
        versions: list[int],
        routing: torch.Tensor | None = None,
    ) -> Completion:
        return Completion(
            prompt_ids=list(prompt),
            token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=finish or "length",  # type: ignore[arg-type]
            logprobs=logps,
            version=min(versions, default=self.version),
            versions=versions,
            routing=routing,
        )

    @staticmethod
    def _sample(
        logits: torch.Tensor, params: SamplingParams, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, behavior log-prob), each (B,). Log-probs come from the raw logits / temperature."""
        if params.temperature == 0.0:
            tok = logits.argmax(-1)
            return tok, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
        scaled = logits / params.temperature
        logp = scaled.log_softmax(-1)
        probs = F.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    def _hits_stop_string(self, toks: list[int], stop: list[str]) -> bool:
        if not stop:
            return False
        # A window of tokens, not the whole text, keeps the check O(1) per step on long generations;
        # it is generous because special tokens and byte-level fragments decode to no character.
        window = 4 * max(len(s) for s in stop) + 16
        tail = self.tokenizer.decode(toks[-window:], skip_special_tokens=True)
        return any(s in tail for s in stop)


class _Rows:
    """Every row of one generate call: the completions so far, by row index in the order rows came."""

    def __init__(
        self,
        engine: TransformersEngine,
        params: SamplingParams,
        gen: torch.Generator,
        stop_ids: set[int],
        on_finish: Callable[[int, Completion], None] | None,
    ) -> None:
        self.engine, self.params, self.gen, self.stop_ids, self.on_finish = engine, params, gen, stop_ids, on_finish
        self.prompts: list[list[int]] = []
        self.limits: list[int] = []
        self.tokens: list[list[int]] = []
        self.logps: list[list[float]] = []
        self.versions: list[list[int]] = []
        self.finish: list[str | None] = []
        self.ended: dict[int, Completion] = {}
        """Completions already reported through `on_finish`."""
        self.recorder: RoutingRecorder | None = None
        self.routing: list[list[torch.Tensor]] = []
        """With a recorder: each row's routing so far, a (tokens, layers, top-k) piece per forward."""

    def start(self, prompts: list[list[int]], limits: list[int]) -> _Batch:
        """New rows, prefilled as a batch of their own (its first tokens not sampled yet)."""
        first = len(self.prompts)
        for p, n in zip(prompts, limits, strict=True):
            self.prompts.append(list(p))
            self.limits.append(n)
            self.tokens.append([])
            self.logps.append([])
            self.versions.append([])
            self.routing.append([])
            self.finish.append(None)
        engine = self.engine
        ids, mask = pad_tokens(prompts, engine.pad_id, "left", engine.device)
        batch = _Batch(
            DynamicCache(config=engine.model.config),
            ids,
            mask,
            positions(mask),
            list(range(first, first + len(prompts))),
        )
        batch.decode(engine.model, self, logits_to_keep=1)
        return batch

    def add(self, i: int, token: int, logp: float) -> bool:
        """Record row i's sampled token; whether the row has ended."""
        self.tokens[i].append(token)
        self.logps[i].append(logp)
        self.versions[i].append(self.engine.version)
        if token in self.stop_ids or self.engine._hits_stop_string(self.tokens[i], self.params.stop):
            self.finish[i] = "stop"
        done = self.finish[i] is not None or len(self.tokens[i]) == self.limits[i]
        if done and self.on_finish is not None:
            self.ended[i] = self.completion(i)
            self.on_finish(i, self.ended[i])
        return done

    def completion(self, i: int) -> Completion:
        """Row i's completion (built once: the one reported when it ended, if it was)."""
        if i in self.ended:
            return self.ended[i]
        routing = torch.cat(self.routing[i]) if self.recorder is not None else None
        return self.engine._completion(
            self.prompts[i], self.tokens[i], self.logps[i], self.finish[i], self.versions[i], routing
        )


class _Batch:
    """The running rows of a decode loop: their KV cache, attention mask, positions, next input tokens."""

    def __init__(
        self, cache: DynamicCache, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, rows: list[int]
    ) -> None:
        self.cache, self.ids, self.mask, self.pos, self.rows = cache, ids, mask, pos, rows
        self.done = torch.zeros(len(rows), dtype=torch.bool, device=ids.device)
        self.logits: torch.Tensor | None = None

    def decode(self, model: PreTrainedModel, rows: _Rows, logits_to_keep: int = 0) -> None:
        """Forward `ids` over the cache; the last position's logits are kept for sampling, and with a
        routing recorder each running row's routing of the tokens it fed (not padding's)."""
        out = model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.pos,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        self.logits = out.logits[:, -1, :].float()
        if rows.recorder is not None:
            fed = self.ids.shape[1]
            routing = rows.recorder.take()
            routing = routing.view(len(self.rows), fed, *routing.shape[1:])
            real = self.mask[:, -fed:].bool().cpu()
            for j in (~self.done).nonzero().flatten().tolist():
                rows.routing[self.rows[j]].append(routing[j][real[j]])

    def sample(self, rows: _Rows) -> _Batch | None:
        """Sample each running row's next token; None when every row has ended. Ended rows leave the
        batch a quarter at a time (so the cache is copied a few times, not at every row's end):
        decoding costs the sum of the completions' lengths, not rows x longest."""
        assert self.logits is not None
        tok, lp = TransformersEngine._sample(self.logits, rows.params, rows.gen)
        for j in (~self.done).nonzero().flatten().tolist():
            self.done[j] = rows.add(self.rows[j], int(tok[j]), float(lp[j]))
        if bool(self.done.all()):
            return None
        if 4 * int(self.done.sum()) >= len(self.rows):
            keep = (~self.done).nonzero().flatten()
            self.cache.batch_select_indices(keep)
            self.rows = [self.rows[j] for j in keep.tolist()]
            tok, self.mask, self.pos, self.done = tok[keep], self.mask[keep], self.pos[keep], self.done[keep]
            self._trim()
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.pos = self.pos[:, -1:] + 1
        self.ids = tok.masked_fill(self.done, rows.engine.pad_id)[:, None]
        return self

    def _trim(self) -> None:
        """Drop the leading positions no row attends to (the rows that were longer have left): a
        batch that rows keep joining (continuous batching) is as wide as its longest running row,
        not as the longest it ever held, and every decode step attends over that width."""
        unused = int(self.mask.cumsum(1).eq(0).all(0).sum())  # leading columns that are padding in every row
        if unused == 0:
            return
        self.mask = self.mask[:, unused:]
        for layer in self.cache.layers:  # the cache holds one position less than the mask: the same start
            for name, dim in (("keys", 2), ("values", 2), ("indexer_keys", 1)):
                t = getattr(layer, name, None)
                if t is not None and t.numel():
                    setattr(layer, name, t.narrow(dim, unused, t.shape[dim] - unused).contiguous())

    @property
    def running(self) -> int:
        return int((~self.done).sum())

    def mergeable(self) -> bool:
        return all(type(layer) in _MERGEABLE for layer in self.cache.layers)

    def merge(self, new: _Batch) -> _Batch:
        """This batch with `new`'s rows joined (both sampled, their next tokens in `ids`): caches and
        masks left-padded to the longer one, masked where padded."""
        length = max(self.mask.shape[1], new.mask.shape[1])  # the cache holds one position less
        for mine, theirs in zip(self.cache.layers, new.cache.layers, strict=True):
            for name, dim in (("keys", 2), ("values", 2), ("indexer_keys", 1)):
                a, b = getattr(mine, name, None), getattr(theirs, name, None)
                if a is not None and b is not None and a.numel() and b.numel():
                    setattr(mine, name, torch.cat([_left_pad(a, dim, length - 1), _left_pad(b, dim, length - 1)]))
        self.mask = torch.cat([_left_pad(self.mask, 1, length), _left_pad(new.mask, 1, length)])
        self.pos = torch.cat([self.pos, new.pos])
        self.ids = torch.cat([self.ids, new.ids])
        self.rows = self.rows + new.rows
        self.done = torch.cat([self.done, new.done])
        return self


_MERGEABLE = (DynamicLayer, DynamicIndexedLayer)
"""KV cache layers whose tensors merge by left padding (full attention, with DSA's indexer keys)."""


def _left_pad(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """`t` zero-padded at the start of `dim` to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
