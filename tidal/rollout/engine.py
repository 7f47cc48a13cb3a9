"""Batched generation with transformers: left padding, KV cache, temperature / top-p / top-k, stops.

Our own decode loop rather than `model.generate`, because RL needs what generate hides or
processes away: the behavior log-prob of each sampled token under logits / temperature taken from
the raw logits, per-row finish reasons, and (later) a chunk boundary where new weights can be
swapped in between tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tidal.modeling import pad_tokens, positions
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


def row_limits(n: int, params: SamplingParams, max_tokens: list[int] | None) -> list[int]:
    """Each of `n` rows' cap on new tokens: `max_tokens` when given (one per row, replacing
    `params.max_new_tokens`), else `params.max_new_tokens` for every row."""
    if max_tokens is None:
        return [params.max_new_tokens] * n
    if len(max_tokens) != n or min(max_tokens) < 1:
        raise ValueError(f"max_tokens must hold one limit >= 1 per prompt: got {max_tokens} for {n} prompts")
    return list(max_tokens)


class Engine(Protocol):
    """What rollout needs of a generation engine (`transformers` here, `vllm` in vllm_engine.py)."""

    tokenizer: PreTrainedTokenizerBase
    version: int
    """Policy version of the weights held."""

    def generate(
        self, prompts: list[list[int]], params: SamplingParams,
        on_chunk: Callable[[], None] | None = None, chunk_tokens: int = 8, max_tokens: list[int] | None = None,
    ) -> list[Completion]:  # fmt: skip
        """One completion per prompt. `max_tokens[i]` caps row i's new tokens (finish reason "length"
        at the cap); None: `params.max_new_tokens` for every row."""
        ...

    def weight_names(self) -> set[str]:
        """HF names of the weights a snapshot must carry."""
        ...

    def load_weights(self, weights: Weights, version: int) -> None:
        """Load a full snapshot of HF names between generations and hold `version`: one state dict,
        or a stream of partial ones (buckets) loaded one at a time."""
        ...


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
        return set(self.model.state_dict())

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
        self, prompts: list[list[int]], params: SamplingParams,
        on_chunk: Callable[[], None] | None = None, chunk_tokens: int = 8, max_tokens: list[int] | None = None,
    ) -> list[Completion]:  # fmt: skip
        """One completion per prompt (repeat a prompt to get a group). Row i stops with finish reason
        "length" at `max_tokens[i]` new tokens (`params.max_new_tokens` for every row when None);
        decoding goes on until every row has stopped, and stopped rows leave the running batch.

        `on_chunk`, when given, is called every `chunk_tokens` decode steps while rows are still
        generating; it may load new weights and bump `self.version` (interruptible generation). The
        KV cache of the tokens so far is kept, as PipelineRL does: each later token is sampled from
        the new weights over that cache, and its behavior log-prob and version (`Completion.versions`)
        record exactly the distribution it was sampled from.
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token (e.g. a BOS token)")
        limits = row_limits(len(prompts), params, max_tokens)
        gen = torch.Generator(device=self.device)
        # An unseeded call seeds only its own generator, never torch's global one.
        gen.manual_seed(params.seed) if params.seed is not None else gen.seed()
        stop_ids = self._stop_ids(params)
        ids, mask = pad_tokens(prompts, self.pad_id, "left", self.device)
        pos = positions(mask)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        n = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        versions: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        rows = list(range(n))  # the prompt index of each row of the running batch
        done = torch.zeros(n, dtype=torch.bool, device=self.device)  # (R,) over the running rows
        for step in range(max(limits)):
            tok, lp = self._sample(out.logits[:, -1, :].float(), params, gen)  # (R,) each
            tok = tok.masked_fill(done, self.pad_id)
            for j in (~done).nonzero().flatten().tolist():
                i, t = rows[j], int(tok[j])
                tokens[i].append(t)
                logps[i].append(float(lp[j]))
                versions[i].append(self.version)
                if t in stop_ids or self._hits_stop_string(tokens[i], params.stop):
                    finish[i] = "stop"
                done[j] = finish[i] is not None or len(tokens[i]) == limits[i]
            if bool(done.all()):
                break
            if 4 * int(done.sum()) >= len(rows):
                # Finished rows leave the batch (a quarter at a time, so the cache is copied a few times,
                # not every step): decoding costs the sum of the completions' lengths, not rows x longest.
                keep = (~done).nonzero().flatten()
                cache.batch_select_indices(keep)
                rows = [rows[j] for j in keep.tolist()]
                tok, mask, pos, done = tok[keep], mask[keep], pos[keep], done[keep]
            if on_chunk is not None and (step + 1) % chunk_tokens == 0:
                on_chunk()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                             past_key_values=cache, use_cache=True)  # fmt: skip
        return [self._completion(*row) for row in zip(prompts, tokens, logps, finish, versions, strict=True)]

    def _completion(self, prompt: list[int], tokens: list[int], logps: list[float], finish: str | None,
                    versions: list[int]) -> Completion:  # fmt: skip
        return Completion(prompt_ids=list(prompt), token_ids=tokens,
                          text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                          finish_reason=finish or "length",  # type: ignore[arg-type]
                          logprobs=logps, version=min(versions, default=self.version), versions=versions)  # fmt: skip

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
