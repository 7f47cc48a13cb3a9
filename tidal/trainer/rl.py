"""From scored groups to one RL update: advantages, the padded batch, log-prob recompute, the loss.

`build_batch` turns groups into a right-padded `TrainBatch` (the proximal and reference log-probs
are filled by `tidal.model.forward.batch_logprobs`); `RLLoss` is the `loss_fn` the DeepSpeed trainer
calls per micro-batch: it returns the aggregation numerator plus its metrics, and the caller
passes the batch's aggregation denominator as the trainer's normalizer.
"""

from __future__ import annotations

import contextlib
import copy
from contextlib import AbstractContextManager
from typing import Any

import torch

from tidal.config import BehaviorCorrection, LossConfig
from tidal.model.batching import Micro, scatter_rows
from tidal.model.forward import Hidden, forward_hidden, head_token_stats, pad, pad_tokens
from tidal.model.routing import RoutingRecorder, has_correction_bias, moe_routers, replay_recorded
from tidal.telemetry.metrics import Metrics
from tidal.trainer.advantages import compute_advantages
from tidal.trainer.losses import aggregate, expert_load_stats, policy_loss, sequence_aux_loss, switch_aux_loss
from tidal.types import Group, TrainBatch, TrainSample


def build_batch(groups: list[Group], estimator: str, pad_id: int) -> tuple[TrainBatch, Metrics]:
    """Advantages per group, then prompt + response rows, right-padded, with per-token fields."""
    samples = [s for g in groups for s in g.samples]
    adv, metrics = episode_advantages(samples, estimator)
    ids, attn = pad_tokens([s.prompt_ids + s.response_ids for s in samples], pad_id)

    def per_token(values: list[list[float]], dtype: torch.dtype) -> torch.Tensor:
        # Response values after zeros on the prompt, so column t holds the token at t.
        return pad([[0] * len(s.prompt_ids) + v for s, v in zip(samples, values, strict=True)], 0, dtype=dtype)

    batch = TrainBatch(
        ids,
        attn,
        per_token([s.loss_mask for s in samples], torch.long),
        logp_mu=per_token([s.logp_mu for s in samples], torch.float32),
        advantages=per_token(
            [[float(a)] * len(s.response_ids) for s, a in zip(samples, adv, strict=True)], torch.float32
        ),
        versions=per_token([s.versions for s in samples], torch.long),
        routing=_routing(samples, ids.shape[1]),
    )
    return batch, metrics


def episode_advantages(samples: list[TrainSample], estimator: str) -> tuple[torch.Tensor, Metrics]:
    """Advantages (N,) of the samples, one per episode: an agent episode split into several samples
    (`TrainSample.episode`) counts once in its group, with its reward once and its trained tokens
    summed, and each of its samples gets the episode's advantage."""
    keys = [(s.group_id, s.episode if s.episode >= 0 else -1 - i) for i, s in enumerate(samples)]
    pos = {k: j for j, k in enumerate(dict.fromkeys(keys))}
    at = torch.tensor([pos[k] for k in keys], dtype=torch.long)  # (N,) the sample's episode
    zeros = torch.zeros(len(pos), dtype=torch.float32)  # (E,)
    rewards = zeros.scatter(0, at, torch.tensor([s.reward for s in samples], dtype=torch.float32))
    group_ids = torch.tensor([s.group_id for s in samples], dtype=torch.long)
    gids = torch.zeros(len(pos), dtype=torch.long).scatter(0, at, group_ids)
    lengths = zeros.index_add(0, at, torch.tensor([float(sum(s.loss_mask)) for s in samples]))
    adv, metrics = compute_advantages(rewards, gids, estimator, token_counts=lengths)
    return adv[at], metrics


def _routing(samples: list[TrainSample], length: int) -> torch.Tensor | None:
    """(B, T, layers, top-k) recorded routing, zero-padded; None unless every sample has one."""
    if not samples or any(s.routing is None for s in samples):
        return None
    first = samples[0].routing
    out = first.new_zeros((len(samples), length, *first.shape[1:]))
    for i, s in enumerate(samples):
        out[i, : len(s.routing)] = s.routing
    return out


def loss_denominator(batch: TrainBatch, cfg: LossConfig, max_len: int) -> float:
    """The aggregation denominator of the whole (mini-)batch, passed to the trainer as normalizer."""
    mask = batch.loss_mask.float()
    return aggregate(torch.zeros_like(mask), mask, cfg.aggregation, max_len)[1]


class RLLoss:
    """`loss_fn(model, micro, packed) -> (numerator, metrics)` for `DeepSpeedTrainer.train_step`."""

    def __init__(
        self, cfg: LossConfig, temperature: float, max_len: int, moe_metrics: bool = True, replay: bool = False
    ) -> None:
        self.cfg = cfg
        self.replay = replay
        """Route each token to the experts in the micro-batch's `routing` (`algorithm.routing_replay`)."""
        self.temperature = temperature
        self.max_len = max_len
        self.moe_metrics = moe_metrics or cfg.router_aux_coef > 0
        self.pi_old_parts: list[torch.Tensor] | None = None
        """When a list: pi_old is the weights of this very forward (one minibatch, `recompute_pi_old:
        auto`); each micro-batch's detached log-probs serve as pi_old and are appended here (CPU)."""

    def for_step(self, replay: bool, collect_pi_old: bool) -> RLLoss:
        """This loss for one step: routing replayed or not, and pi_old collected from the update's own
        forward or not (the step's inputs, on a loss of its own rather than this shared one)."""
        step = copy.copy(self)
        step.replay = replay
        step.pi_old_parts = [] if collect_pi_old else None
        return step

    def around(self, model: torch.nn.Module, micro: TrainBatch) -> AbstractContextManager[Any]:
        """The context a micro-batch's forward and backward run in (`DeepSpeedTrainer.train_step`'s
        `around`): routing replayed, when this loss replays (`algorithm.routing_replay`)."""
        return replay_recorded(model, micro) if self.replay else contextlib.nullcontext()

    def take_pi_old(self, micros: list[Micro], rows: int, width: int) -> torch.Tensor:
        """The pi_old log-probs collected (`for_step(collect_pi_old=True)`) over the step's `micros`
        (`DeepSpeedTrainer.micros`), as (rows, width): this rank's rows in order."""
        assert self.pi_old_parts is not None
        return scatter_rows(self.pi_old_parts, micros, rows, width)

    def __call__(self, model: torch.nn.Module, micro: TrainBatch, packed: bool = False) -> tuple[torch.Tensor, Metrics]:
        cfg = self.cfg
        mask = micro.loss_mask.float()  # (B, T)
        recorder = RoutingRecorder(model) if self.moe_metrics and moe_routers(model) else None
        if recorder is None and cfg.router_aux_coef > 0:
            raise ValueError(f"algorithm.loss.router_aux_coef > 0 but {type(model).__name__} has no MoE router")
        with recorder or contextlib.nullcontext():
            hidden = forward_hidden(
                model, micro.input_ids, micro.attention_mask, router_logits=recorder is not None, packed=packed
            )
        # The bonus needs the entropy with grad; otherwise it is a metric, computed without one.
        logp, H = head_token_stats(  # (B, T) each
            hidden, micro.input_ids, self.temperature, entropy="grad" if cfg.entropy_coef > 0 else "metric"
        )
        if self.pi_old_parts is not None:
            logp_old = logp.detach()
            self.pi_old_parts.append(logp_old.cpu())
        elif isinstance(cfg.correction, BehaviorCorrection) or micro.logp_old is None:
            logp_old = micro.logp_mu
        else:
            logp_old = micro.logp_old
        per_token, metrics = policy_loss(
            logp,
            logp_old,
            micro.logp_mu,
            micro.advantages,
            mask,
            cfg,
            keep=micro.m2po_keep,
            logp_ref=micro.logp_ref,
            entropy=H,
        )
        numerator, _ = aggregate(per_token, mask, cfg.aggregation, self.max_len)
        if recorder is not None:
            aux, moe = _balance(recorder, hidden, micro.attention_mask.bool())
            metrics.update(moe)
            if cfg.router_aux_coef > 0:
                # The aux loss is a mean over this micro-batch's tokens (or sequences); weighting it by
                # the micro-batch's share of the denominator keeps it a mean after the trainer's division.
                share = aggregate(torch.zeros_like(mask), mask, cfg.aggregation, self.max_len)[1]
                numerator = numerator + cfg.router_aux_coef * aux * share
        return numerator, metrics


def _balance(recorder: RoutingRecorder, hidden: Hidden, real: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """(aux loss, `moe/` metrics) of one forward's routing: the expert load of the experts the real
    tokens (B, T) went to, as `recorder` saw them, and the architecture's own balance loss: DeepSeek-V3's
    sequence-wise one for sigmoid-scored routers with a correction bias (GLM), Switch's otherwise."""
    picked, router_logits = hidden.unpack(recorder.take()), hidden.router  # (B*T, MoE layers, top-k), (B*T, E)s
    metrics = expert_load_stats(picked, real.flatten(), recorder.num_experts)
    balance = sequence_aux_loss if any(has_correction_bias(r) for r in recorder.routers) else switch_aux_loss
    aux, moe = balance(router_logits, picked, real)
    return aux, {**metrics, **moe}
