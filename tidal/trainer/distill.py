"""On-policy distillation: the teacher's per-token signal, as a term of the per-token advantage.

The student samples; a frozen teacher scores every sampled token. With mu the behaviour policy that
sampled token y_t (its log-prob recorded by the rollout) and p_T the teacher, the per-token signal is

    s_t = log p_T(y_t) - log mu(y_t),

the negative of the single-sample estimate of the reverse KL at position t: its expectation over
y_t ~ mu is -KL(mu_t || p_T,t) <= 0 (Agarwal et al. 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes"; Lu, Thinking Machines Lab 2025, "On-Policy
Distillation", Tinker's recipe: discount 0, the per-token reverse KL as the advantage). It enters
the loss as an advantage, so the policy loss's off-policy correction (TIS, mask, decoupled PPO) and
trust region apply to it exactly as they do to the reward's:

    A_t = reward_coef * A_reward(sample) + coef * s_t.

Tokens the teacher likes more than the student did get a positive advantage, the others a negative
one; a student equal to the teacher gets none.
"""

from __future__ import annotations

import torch

from tidal.telemetry.metrics import Metrics, mean

POSITION_BUCKETS = (0, 4, 16, 64, 256)
"""Starts of the position buckets of `distill/reverse_kl_pos*`: a token's position is its index among
its sample's trained tokens (0 the first generated token); the last bucket is open-ended."""


def teacher_signal(logp_teacher: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s = log p_T - log mu per token (B, T), 0 where `mask` (B, T) is 0 (prompt, padding, tool output)."""
    valid = mask.bool()
    return torch.where(valid, logp_teacher.float() - logp_mu.float(), 0.0)


def distill_advantages(
    reward_advantages: torch.Tensor,
    logp_teacher: torch.Tensor,
    logp_mu: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    reward_coef: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Per-token advantages (B, T) reward_coef * A_reward + coef * (log p_T - log mu), and the
    `distill/` metrics of the batch.

    `reward_advantages` (B, T) is each token's sequence advantage (`tidal.trainer.rl.build_batch`),
    `logp_teacher` the teacher's log-probs of the sampled tokens, `logp_mu` the behaviour log-probs,
    `mask` the trained tokens; every value is 0 outside `mask`.

    Metrics, means over the trained tokens (weighted by their count): `distill/reverse_kl`, the
    per-token reverse KL estimate log mu - log p_T; `distill/reverse_kl_pos{lo}_{hi}`, the same over
    the tokens at positions lo..hi of their sample (`POSITION_BUCKETS`, a bucket without tokens
    left out); `distill/teacher_logp`, the teacher's log-prob of the samples; `distill/teacher_share`,
    mean |coef s| / (mean |coef s| + mean |reward_coef A_reward|), how much of the signal is the
    teacher's (1: the teacher's alone; 0.5: as large as the reward's).
    """
    valid = mask.bool()  # (B, T)
    s = teacher_signal(logp_teacher, logp_mu, mask)  # (B, T)
    from_teacher = coef * s  # (B, T)
    from_reward = torch.where(valid, reward_coef * reward_advantages.float(), 0.0)  # (B, T)
    n = valid.sum()
    tokens = float(n)
    per = max(tokens, 1.0)
    teacher_abs, reward_abs = float(from_teacher.abs().sum()) / per, float(from_reward.abs().sum()) / per
    metrics: Metrics = {
        "distill/reverse_kl": mean(float(-s.sum()) / per, tokens),
        "distill/teacher_logp": mean(float(torch.where(valid, logp_teacher.float(), 0.0).sum()) / per, tokens),
        "distill/teacher_share": mean(teacher_abs / max(teacher_abs + reward_abs, 1e-12), tokens),
    }
    position = valid.long().cumsum(-1) - 1  # (B, T) index among the sample's trained tokens
    ends = (*POSITION_BUCKETS[1:], None)
    for lo, hi in zip(POSITION_BUCKETS, ends, strict=True):
        here = valid & (position >= lo) & (position < hi if hi is not None else True)  # (B, T)
        count = float(here.sum())
        if count:
            name = f"distill/reverse_kl_pos{lo}_{hi - 1 if hi is not None else 'up'}"
            metrics[name] = mean(float(torch.where(here, -s, 0.0).sum()) / count, count)
    return from_reward + from_teacher, metrics
