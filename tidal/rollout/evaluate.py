"""Held-out evaluation: greedy samples generated and scored exactly as in training.

The one evaluation path of every stage (`tidal train`'s workers, `tidal sft`, `tidal eval`): each
held-out row goes through its env's runtime (the run's data and `rewards.functions` without `envs`),
so `eval/accuracy` is the env's `is_correct` (reward >= `rewards.correct_threshold` without envs)
and `eval/reward` its reward, whatever the reward functions are. With a forward model of the same
weights at hand (the transformers engine's), the engine's log-probs are also checked against a
teacher-forced forward (`eval/logp_mismatch_*`; the trainer's own check of every batch is
`rollout/logp_mismatch_*`).
"""

from __future__ import annotations

import torch

from tidal.config import EvalConfig, RolloutConfig
from tidal.model.forward import completion_logprobs, logp_mismatch
from tidal.rollout.engines.base import Engine
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.rollout.env_runtime import EnvRuntime, eval_metrics, generate_samples, group_by_env
from tidal.telemetry.metrics import Metrics, largest, mean
from tidal.types import Prompt, Sample, SamplingParams


def evaluate(
    engine: Engine,
    runtimes: dict[str, EnvRuntime],
    prompts: list[Prompt],
    eval_cfg: EvalConfig,
    rollout: RolloutConfig,
    forward_model: torch.nn.Module | None = None,
) -> tuple[Metrics, list[Sample]]:
    """Greedy held-out metrics of `prompts` (at most `eval.num_samples` per env) and the scored samples.

    `forward_model`, a model holding the engine's weights, adds the behavior-vs-teacher-forced
    log-prob mismatch over the model's own tokens.
    """
    max_new = eval_cfg.max_new_tokens or rollout.max_new_tokens
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, seed=0)
    samples: list[Sample] = []
    for label, group in group_by_env(prompts).items():
        group = group[: eval_cfg.num_samples]  # per env, so every env is evaluated
        samples += generate_samples(runtimes[label], engine, group, 1, params, rollout)
    out = eval_metrics(runtimes, samples)
    if forward_model is not None and samples:
        out.update(_mismatch(forward_model, samples, engine.tokenizer.pad_token_id))
    return out, samples


def own_forward(engine: Engine) -> torch.nn.Module | None:
    """The model that generates, when the engine has one to share as a forward of the same weights
    (the transformers engine); vLLM keeps its model inside its own workers."""
    return engine.model if isinstance(engine, TransformersEngine) else None


def _mismatch(model: torch.nn.Module, samples: list[Sample], pad_id: int) -> Metrics:
    """|behavior - teacher-forced| log-prob over the model's own tokens (observations left out)."""
    recomputed = completion_logprobs(model, [s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id)
    behavior = torch.tensor([lp for s in samples for lp in s.logp_mu])
    mask = torch.tensor([m for s in samples for m in s.loss_mask])
    gap = logp_mismatch(behavior, torch.cat(recomputed), mask)
    if not gap:
        return {}
    return {
        "eval/logp_mismatch_mean": mean(gap["logp_mismatch_mean"], float(mask.sum())),
        "eval/logp_mismatch_max": largest(gap["logp_mismatch_max"]),
    }
