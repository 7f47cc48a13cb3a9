"""The Trainer actor: pulls groups from the buffer, takes RL steps with DeepSpeed, publishes weights.

A plain class the driver turns into a Ray actor with `ray.remote`. One `step()` is one rollout
batch: advantages, the proximal log-probs recomputed with the weights held before the update (and
the reference's, with a KL penalty), then `algorithm.minibatches` optimizer steps.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tidal.config import BehaviorCorrection, RunConfig
from tidal.models import load_model, load_tokenizer
from tidal.trainer.engine import DeepSpeedTrainer
from tidal.trainer.rl import RLLoss, build_batch, loss_denominator, recompute_logprobs, split_rows
from tidal.types import Group

STEP_WAIT_S = 600.0
"""Longest wait for the buffer to answer; a hung buffer must fail loudly, not stall the run."""


class TrainerActor:
    def __init__(self, cfg: RunConfig, model_dir: str, buffer: Any = None) -> None:
        torch.set_num_threads(max(1, math.ceil(cfg.trainer.num_cpus)))
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.buffer = buffer
        self.tokenizer = load_tokenizer(model_dir)
        steps = cfg.train.steps * cfg.algorithm.minibatches
        self.trainer = DeepSpeedTrainer(load_model(model_dir), cfg.trainer, total_steps=steps)
        # The reference is the frozen initial policy; loaded only when the KL penalty is on.
        self.ref = load_model(model_dir).eval().requires_grad_(False) if cfg.algorithm.loss.kl.coef > 0 else None
        self.loss = RLLoss(cfg.algorithm.loss, cfg.rollout.temperature, cfg.rollout.max_new_tokens)

    @property
    def version(self) -> int:
        return self.trainer.version

    def step(self, groups: list[Group] | None = None) -> dict[str, float]:
        """One rollout batch: from `groups`, or pulled from the buffer. Returns train metrics."""
        t0 = time.perf_counter()
        if groups is None:
            import ray

            ref = self.buffer.get.remote(self.cfg.rollout.prompts_per_step, self.version)
            groups = ray.get(ref, timeout=STEP_WAIT_S)
        if not groups:
            return {"train/skipped_steps": 1.0}
        ages = [self.version - s.version for g in groups for s in g.samples]
        batch, metrics = build_batch(groups, self.cfg.algorithm.advantage, self.tokenizer.pad_token_id)
        t_prep = time.perf_counter()
        cfg, temp = self.cfg, self.cfg.rollout.temperature
        mb = cfg.trainer.micro_batch_size
        if not isinstance(cfg.algorithm.loss.correction, BehaviorCorrection):
            batch.logp_old = recompute_logprobs(self.trainer.module, batch, temp, mb)
            metrics.update(_mismatch(batch.logp_old, batch.logp_mu, batch.loss_mask))
        if self.ref is not None:
            batch.logp_ref = recompute_logprobs(self.ref, batch, temp, mb)
        t_recompute = time.perf_counter()
        steps = []
        for minibatch in split_rows(batch, cfg.algorithm.minibatches):
            norm = loss_denominator(minibatch, cfg.algorithm.loss, cfg.rollout.max_new_tokens)
            steps.append(self.trainer.train_step(minibatch, loss_fn=self.loss, normalizer=norm))
        t_end = time.perf_counter()
        for k in steps[-1]:
            vals = [s[k] for s in steps]
            # The loss's metrics carry their namespace (train/, offpolicy/, moe/); the trainer's do not.
            metrics[k if "/" in k else f"train/{k}"] = max(vals) if k.endswith("_max") else statistics.fmean(vals)
        tokens = float(batch.loss_mask.sum())
        metrics.update({
            "train/version": float(self.version),
            "train/samples": float(batch.input_ids.shape[0]),
            "async/staleness_mean": statistics.fmean(ages),
            "async/staleness_max": float(max(ages)),
            "perf/train_tokens": tokens,
            "perf/train_tokens_per_s": tokens / max(t_end - t_recompute, 1e-9),
            "perf/recompute_time_s": t_recompute - t_prep,
            "perf/train_time_s": t_end - t0,
        })  # fmt: skip
        return metrics

    def publish(self) -> tuple[dict[str, torch.Tensor], int]:
        """(full fp32 state dict, version) of the current policy, for the workers."""
        return self.trainer.state_dict_for_export(), self.version

    def save(self, out_dir: str) -> str:
        return str(self.trainer.save_hf(Path(out_dir), self.tokenizer))


def _mismatch(logp_old: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Train/inference mismatch |logp_old - logp_mu| over response tokens (same keys as evaluation)."""
    valid = mask.bool()
    diff = (logp_old - logp_mu).abs()[valid]
    diff = diff[torch.isfinite(diff)]
    if diff.numel() == 0:
        return {}
    return {"rollout/logp_mismatch_mean": float(diff.mean()), "rollout/logp_mismatch_max": float(diff.max())}
