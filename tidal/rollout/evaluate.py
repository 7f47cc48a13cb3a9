"""Held-out evaluation with greedy decoding, and the train/inference log-prob mismatch."""

from __future__ import annotations

from typing import Any

from tidal.config import DataConfig, EvalConfig
from tidal.data import encode_prompts, exact_match
from tidal.rollout.engine import Engine, TransformersEngine, logp_mismatch, teacher_forced_logprobs
from tidal.types import SamplingParams


def evaluate(
    engine: Engine, rows: list[dict[str, Any]], data_cfg: DataConfig, eval_cfg: EvalConfig,
    batch_size: int = 64,
) -> dict[str, float]:  # fmt: skip
    """Greedy accuracy on `rows` (exact match), mean response length, and the log-prob mismatch
    between the engine's behavior log-probs and a teacher-forced forward of the same weights (with the
    transformers engine; vLLM's gap to the trainer's forward is the trainer's per-step
    `rollout/logp_mismatch_*` at max_staleness 0)."""
    if eval_cfg.num_samples is not None:
        rows = rows[: eval_cfg.num_samples]
    params = SamplingParams(temperature=0.0, max_new_tokens=eval_cfg.max_new_tokens, seed=0)
    hf = engine if isinstance(engine, TransformersEngine) else None  # a forward of the same weights, here
    correct, lengths, behavior, recomputed = 0, [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        outs = engine.generate(encode_prompts(engine.tokenizer, chunk, data_cfg), params)
        correct += sum(exact_match(o.text, r["answer"]) for o, r in zip(outs, chunk, strict=True))
        lengths += [len(o.token_ids) for o in outs]
        if hf is not None:
            behavior += [o.logprobs for o in outs]
            recomputed += teacher_forced_logprobs(
                hf.model, [o.prompt_ids for o in outs], [o.token_ids for o in outs], hf.pad_id
            )
    n = max(len(rows), 1)
    out = {"eval/accuracy": correct / n, "eval/response_length": sum(lengths) / n, "eval/num_samples": float(len(rows))}
    if hf is not None:
        mismatch = logp_mismatch(behavior, recomputed)
        out["rollout/logp_mismatch_mean"] = mismatch["logp_mismatch_mean"]
        out["rollout/logp_mismatch_max"] = mismatch["logp_mismatch_max"]
    return out
