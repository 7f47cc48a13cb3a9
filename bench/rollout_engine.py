"""Generated tokens/s of TransformersEngine against a bare HF `model.generate` on the same batch.

Both sample at the same temperature (no top-k / top-p), from the same left-padded batch, for the
same number of new tokens: eos is switched off in both (the model's generation config and the
engine's tokenizer), so every row runs to max_new_tokens and the token counts are checked equal.
Repeats are interleaved (the order alternates) and the median time of each is reported, so drift in
the machine's load hits both alike. The ratio engine_time / hf_time is the engine's overhead.

    .venv/bin/python bench/rollout_engine.py [--batch 64] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import string
import time
from collections.abc import Callable

import torch
import transformers

from tidal.model.forward import pad_tokens
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.types import SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny-qwen3-moe", "tiny-glm4-moe"])
    p.add_argument("--batch", type=int, default=64, help="prompts per batch")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each, interleaved")
    p.add_argument("--temperature", type=float, default=1.0)
    # One thread by default: these matrices are tiny, and on a shared machine oversubscribed
    # OpenMP threads make the timings meaningless.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p.parse_args()


def make_prompts(tok: transformers.PreTrainedTokenizerBase, n: int, seed: int = 0) -> list[list[int]]:
    """n random printable prompts of 8 to 32 characters (tokens), so the batch is left-padded."""
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + " +-*=,."
    texts = ["".join(rng.choices(chars, k=rng.randint(8, 32))) for _ in range(n)]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def bench_preset(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(engine tokens/s, hf tokens/s), medians over interleaved repeats."""
    path = materialize_preset(name, seed=0)
    model, tok = load_model(path), load_tokenizer(path)
    # eos off in both, so each row generates exactly new_tokens tokens.
    model.generation_config.eos_token_id = None
    no_eos_tok = copy.deepcopy(tok)
    no_eos_tok.eos_token = None
    engine = TransformersEngine(model, no_eos_tok)
    prompts = make_prompts(tok, args.batch)
    ids, mask = pad_tokens(prompts, tok.pad_token_id, "left")
    expected = args.batch * args.new_tokens
    step = {"seed": 0}

    def run_engine() -> int:
        step["seed"] += 1
        params = SamplingParams(temperature=args.temperature, max_new_tokens=args.new_tokens, seed=step["seed"])
        return sum(len(c.token_ids) for c in engine.generate(prompts, params))

    @torch.no_grad()
    def run_hf() -> int:
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=args.new_tokens,
            pad_token_id=tok.pad_token_id,
        )
        return out[:, ids.shape[1] :].numel()

    runs = {"engine": run_engine, "hf": run_hf}
    for fn in runs.values():  # warm-up: first-call allocations and lazy init
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        for k in list(runs)[:: 1 if r % 2 == 0 else -1]:
            seconds, tokens = timed(runs[k])
            if tokens != expected:
                raise RuntimeError(f"{k} generated {tokens} tokens, expected {expected}")
            times[k].append(seconds)
    return expected / statistics.median(times["engine"]), expected / statistics.median(times["hf"])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
        f"batch {args.batch} x {args.new_tokens} new tokens, temperature {args.temperature}, "
        f"median of {args.repeats} interleaved repeats; cache {os.environ.get('TIDAL_CACHE', 'default')}"
    )
    print(f"{'preset':<16} {'engine tok/s':>13} {'hf tok/s':>10} {'engine/hf time':>15}")
    for name in args.presets:
        ours, hf = bench_preset(name, args)
        print(f"{name:<16} {ours:>13.0f} {hf:>10.0f} {hf / ours:>15.2f}")


if __name__ == "__main__":
    main()
