"""From scored groups to one RL update: advantages, the padded batch, log-prob recompute, the loss.

`build_batch` turns groups into a right-padded `TrainBatch`; `recompute_logprobs` fills the
proximal (and reference) log-probs without grad; `rl_loss` is the `loss_fn` the DeepSpeed trainer
calls per micro-batch: it returns the aggregation numerator plus token-sum metrics, and the caller
passes the batch's aggregation denominator as the trainer's normalizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from tidal.config import BehaviorCorrection, LossConfig
from tidal.rollout.engine import positions
from tidal.trainer.advantages import compute_advantages
from tidal.trainer.losses import aggregate, entropy_from_logits, policy_loss, router_aux_loss, token_logprobs
from tidal.types import Group, TrainBatch


def build_batch(groups: list[Group], estimator: str, pad_id: int) -> tuple[TrainBatch, dict[str, float]]:
    """Advantages per group, then prompt + response rows, right-padded, with per-token fields."""
    samples = [s for g in groups for s in g.samples]
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    gids = torch.tensor([s.group_id for s in samples], dtype=torch.long)
    adv, metrics = compute_advantages(rewards, gids, estimator)
    width = max(s.num_tokens for s in samples)
    b = len(samples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn, loss_mask, versions = (torch.zeros((b, width), dtype=torch.long) for _ in range(3))
    logp_mu, advantages = (torch.zeros((b, width)) for _ in range(2))
    for i, s in enumerate(samples):
        p, n = len(s.prompt_ids), len(s.response_ids)
        ids[i, : p + n] = torch.tensor(s.prompt_ids + s.response_ids)
        attn[i, : p + n] = 1
        loss_mask[i, p : p + n] = torch.tensor(s.loss_mask)
        versions[i, p : p + n] = torch.tensor(s.versions)
        logp_mu[i, p : p + n] = torch.tensor(s.logp_mu)
        advantages[i, p : p + n] = adv[i]
    batch = TrainBatch(ids, attn, loss_mask, logp_mu=logp_mu, advantages=advantages, versions=versions)
    return batch, metrics


def split_rows(batch: TrainBatch, parts: int) -> list[TrainBatch]:
    """Split a batch into `parts` mini-batches of (nearly) equal row counts."""
    b = batch.input_ids.shape[0]
    bounds = [round(i * b / parts) for i in range(parts + 1)]
    return [_rows(batch, bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def _rows(batch: TrainBatch, start: int, end: int) -> TrainBatch:
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dataclasses.replace(batch, **{k: v[start:end] for k, v in fields.items() if isinstance(v, torch.Tensor)})


def _chunks(batch: TrainBatch, size: int) -> Iterator[TrainBatch]:
    for start in range(0, batch.input_ids.shape[0], size):
        yield _rows(batch, start, start + size)


def forward(model: torch.nn.Module, batch: TrainBatch, router_logits: bool = False) -> tuple[torch.Tensor, tuple]:
    """(logits (B, T, V), router logits per MoE layer or ()) of a causal LM over the batch."""
    kwargs = {"output_router_logits": True} if router_logits else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=positions(batch.attention_mask), use_cache=False, **kwargs)  # fmt: skip
    return out.logits, tuple(getattr(out, "router_logits", None) or ())


@torch.no_grad()
def recompute_logprobs(
    model: torch.nn.Module, batch: TrainBatch, temperature: float, micro_batch_size: int
) -> torch.Tensor:
    """(B, T) log-probs of the batch's tokens under `model` at the sampling temperature."""
    device = next(model.parameters()).device
    parts = []
    for micro in _chunks(batch, micro_batch_size):
        micro = dataclasses.replace(micro, input_ids=micro.input_ids.to(device),
                                    attention_mask=micro.attention_mask.to(device))  # fmt: skip
        logits, _ = forward(model, micro)
        parts.append(token_logprobs(logits, micro.input_ids, temperature).float().cpu())
    return torch.cat(parts)


def loss_denominator(batch: TrainBatch, cfg: LossConfig, max_len: int) -> float:
    """The aggregation denominator of the whole (mini-)batch, passed to the trainer as normalizer."""
    mask = batch.loss_mask.float()
    return aggregate(torch.zeros_like(mask), mask, cfg.aggregation, max_len)[1]


class RLLoss:
    """`loss_fn(model, micro) -> (numerator, token-sum metrics)` for `DeepSpeedTrainer.train_step`."""

    def __init__(self, cfg: LossConfig, temperature: float, max_len: int, moe_metrics: bool = True) -> None:
        self.cfg = cfg
        self.temperature = temperature
        self.max_len = max_len
        self.moe_metrics = moe_metrics or cfg.router_aux_coef > 0

    def __call__(self, model: torch.nn.Module, micro: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        mask = micro.loss_mask.float()  # (B, T)
        logits, router = forward(model, micro, router_logits=self.moe_metrics)
        logp = token_logprobs(logits, micro.input_ids, self.temperature)  # (B, T)
        entropy = entropy_from_logits(logits, self.temperature)
        if cfg.entropy_coef == 0:
            entropy = entropy.detach()
        behavior = isinstance(cfg.correction, BehaviorCorrection)
        logp_old = micro.logp_mu if behavior or micro.logp_old is None else micro.logp_old
        per_token, metrics = policy_loss(logp, logp_old, micro.logp_mu, micro.advantages, mask, cfg,
                                         logp_ref=micro.logp_ref, entropy=entropy)  # fmt: skip
        numerator, _ = aggregate(per_token, mask, cfg.aggregation, self.max_len)
        n_tokens = mask[:, 1:].sum()
        if router:
            aux, moe = router_aux_loss(router, model_num_experts(model), model_top_k(model), micro.attention_mask)
            metrics.update(moe)
            if cfg.router_aux_coef > 0:
                # The aux loss is a per-token mean; weighting it by this micro-batch's share of the
                # denominator keeps it a mean after the trainer's division.
                share = aggregate(torch.zeros_like(mask), mask, cfg.aggregation, self.max_len)[1]
                numerator = numerator + cfg.router_aux_coef * aux * share
        elif cfg.router_aux_coef > 0:
            raise ValueError("algorithm.loss.router_aux_coef > 0 but the model returns no router logits")
        # Means over this micro-batch's tokens become token sums; the trainer divides by all tokens.
        sums = {k: v if k.endswith("_max") else v * n_tokens for k, v in metrics.items()}
        return numerator, sums


def _moe_config(model: torch.nn.Module) -> object:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    return module.config


def model_num_experts(model: torch.nn.Module) -> int:
    c = _moe_config(model)
    return int(getattr(c, "num_experts", None) or getattr(c, "n_routed_experts", None) or 0)


def model_top_k(model: torch.nn.Module) -> int:
    return int(getattr(_moe_config(model), "num_experts_per_tok", 1))
