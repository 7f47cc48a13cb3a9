"""The RolloutWorker: one frozen, versioned policy snapshot that turns prompts into scored groups.

A plain class (usable in-process) that the driver turns into a Ray actor with `ray.remote`. It
generates `group_size` completions per prompt with the rollout engine, scores them with the reward
functions, and puts the groups into the TrajectoryBuffer. New weights are loaded only between
generations, so a sample never mixes two versions.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from tidal.config import RunConfig
from tidal.data import encode_prompts
from tidal.models import load_model, load_tokenizer
from tidal.rewards import RewardScorer
from tidal.rollout.engine import TransformersEngine
from tidal.rollout.evaluate import evaluate
from tidal.types import Completion, Group, Sample, SamplingParams

log = logging.getLogger(__name__)


def sampling_params(cfg: RunConfig, seed: int) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, stop=list(r.stop), seed=seed)  # fmt: skip


def to_sample(c: Completion, group_id: int, row: dict[str, Any]) -> Sample:
    return Sample(
        group_id=group_id,
        prompt_ids=c.prompt_ids,
        response_ids=c.token_ids,
        loss_mask=[1] * len(c.token_ids),
        logp_mu=c.logprobs,
        finish_reason=c.finish_reason,
        version=c.version,
        versions=[c.version] * len(c.token_ids),
        text=c.text,
        row=row,
    )


class RolloutWorker:
    def __init__(self, cfg: RunConfig, model_dir: str, index: int = 0, buffer: Any = None) -> None:
        torch.set_num_threads(max(1, math.ceil(cfg.rollout.num_cpus_per_worker)))
        self.cfg = cfg
        self.index = index
        self.buffer = buffer
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        self.engine = TransformersEngine(load_model(model_dir, dtype), load_tokenizer(model_dir), version=0)
        self.scorer = RewardScorer(cfg.rewards)

    @property
    def version(self) -> int:
        return self.engine.version

    def rollout(self, prompts: list[tuple[int, dict[str, Any]]], seed: int) -> tuple[list[Group], dict[str, float]]:
        """Generate and score one group per (group_id, row); puts them into the buffer when one is
        attached (and then returns no groups), else returns them. Metrics are this call's."""
        t0 = time.perf_counter()
        rows = [row for _, row in prompts]
        ids = encode_prompts(self.engine.tokenizer, rows, self.cfg.data)
        n = self.cfg.rollout.group_size
        flat_prompts = [p for p in ids for _ in range(n)]
        flat_meta = [(gid, row) for gid, row in prompts for _ in range(n)]
        completions: list[Completion] = []
        bs = self.cfg.rollout.batch_size
        for i, start in enumerate(range(0, len(flat_prompts), bs)):
            params = sampling_params(self.cfg, seed=seed * 1_000_003 + i)
            completions += self.engine.generate(flat_prompts[start : start + bs], params)
        t_gen = time.perf_counter() - t0
        samples = [to_sample(c, gid, row) for c, (gid, row) in zip(completions, flat_meta, strict=True)]
        reward_metrics = self.scorer.score(samples)
        groups = [Group(gid, samples[k * n : (k + 1) * n]) for k, (gid, _) in enumerate(prompts)]
        tokens = sum(len(s.response_ids) for s in samples)
        metrics = {
            **reward_metrics,
            "rollout/accuracy": _mean([float(s.reward > 0) for s in samples]),
            "rollout/response_length": tokens / max(len(samples), 1),
            "rollout/truncated_frac": _mean([float(s.finish_reason == "length") for s in samples]),
            "rollout/samples": float(len(samples)),
            "perf/rollout_tokens": float(tokens),
            "perf/generate_time_s": t_gen,
            "perf/rollout_time_s": time.perf_counter() - t0,
        }
        if self.buffer is not None:
            import ray

            ray.get(self.buffer.put.remote(groups))
            return [], metrics
        return groups, metrics

    def load_weights(self, snapshot: tuple[dict[str, torch.Tensor], int]) -> int:
        """Swap in a published (state dict, version) snapshot between generations; returns the
        version now held."""
        state_dict, version = snapshot
        model = self.engine.model
        # Checked before loading: a snapshot that does not fit must leave the old weights intact.
        params = {n for n, _ in model.named_parameters()}
        missing, unexpected = sorted(params - set(state_dict)), sorted(set(state_dict) - set(model.state_dict()))
        if missing or unexpected:
            raise RuntimeError(f"weight snapshot v{version} does not fit the rollout model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")  # fmt: skip
        dtype = next(model.parameters()).dtype
        model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False)
        self.engine.version = version
        return version

    def evaluate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return evaluate(self.engine, rows, self.cfg.data, self.cfg.eval, batch_size=self.cfg.rollout.batch_size)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
