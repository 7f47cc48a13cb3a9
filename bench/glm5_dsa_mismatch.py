"""How far GLM-5 sparse attention's log-probs drift between paths, with and without tidal's fix.

For the tiny-glm5-moe preset (random init, fp32, eager) and random token sequences it prints
max and mean |Δ log p(next token)| between
  cached: prefill a prompt, then decode one token at a time with a DynamicCache, and
  full:   one forward over the whole sequence;
and between a forward over the first 80% of each sequence and the same positions of the full one.
With index_topk >= sequence length the attention is dense and both gaps are rounding noise.

    TIDAL_CACHE=/tmp/tc .venv/bin/python bench/glm5_dsa_mismatch.py [--weight-scale 5]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.utils import logging as hf_logging

from tidal.model.loading import materialize_preset
from tidal.model.patches import apply_model_fixes

PRESET = "tiny-glm5-moe"
NUM_SPECIAL = 6  # token ids below this are special tokens; sequences use plain characters only


def load(seed: int, index_topk: int, fixed: bool, weight_scale: float) -> PreTrainedModel:
    path = materialize_preset(PRESET, seed)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", index_topk=index_topk
    ).eval()
    with torch.no_grad():
        # Larger weights spread the indexer scores, so near-ties (as opposed to exact ones) are rare.
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(weight_scale)
    if fixed:
        apply_model_fixes(model)
    return model


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for every t; (B, T, V), (B, T) -> (B, T-1)."""
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def cached_logits(model: PreTrainedModel, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(steps, dim=1)  # (B, T, V)


@torch.no_grad()
def gaps(model: PreTrainedModel, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|Δ log p| of cached vs full, and of prefix-alone vs full; each (B, positions)."""
    full = token_logprobs(model(ids).logits, ids)
    cached = token_logprobs(cached_logits(model, ids, prefill), ids)
    n = ids.shape[1] * 4 // 5
    prefix = token_logprobs(model(ids[:, :n]).logits, ids[:, :n])
    return (cached - full).abs(), (prefix - full[:, : n - 1]).abs()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100, help="sequence length")
    ap.add_argument("--batch", type=int, default=4, help="random sequences per model")
    ap.add_argument("--seeds", type=int, default=3, help="model init seeds")
    ap.add_argument("--prefill", type=int, default=48, help="prompt length before one-token decoding")
    ap.add_argument("--weight-scale", type=float, default=1.0, help="multiply non-embedding weights")
    args = ap.parse_args()
    hf_logging.disable_progress_bar()

    print(f"{args.seeds} models x {args.batch} sequences x {args.tokens} tokens, weight x{args.weight_scale}")
    print("index_topk  fix | cached-vs-full max      mean | prefix-vs-full max      mean")
    for index_topk in (64, 256):
        for fixed in (False, True):
            cached, prefix = [], []
            for seed in range(args.seeds):
                model = load(seed, index_topk, fixed, args.weight_scale)
                ids = torch.randint(
                    NUM_SPECIAL,
                    model.config.vocab_size,
                    (args.batch, args.tokens),
                    generator=torch.Generator().manual_seed(seed),
                )
                c, p = gaps(model, ids, args.prefill)
                cached.append(c)
                prefix.append(p)
            c, p = torch.cat(cached), torch.cat(prefix)
            print(
                f"{index_topk:>10} {'on' if fixed else 'off':>4} | {c.max():>18.3g} {c.mean():>9.2g} |"
                f" {p.max():>18.3g} {p.mean():>9.2g}"
            )


if __name__ == "__main__":
    main()
