"""Group-relative advantage estimators.

Every estimator maps per-sample scalar rewards `r` (N,) and group ids (N,) to advantages (N,).
A group is the set of completions of one prompt; groups may have unequal sizes (after filtering)
and their samples need not be contiguous. Baselines and normalisation are always taken PER GROUP,
never over the batch (peers normalised over the batch when groups had unequal sizes, slime #1414),
except for REINFORCE++'s final whitening over the batch's tokens, which is part of that method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tidal.telemetry.metrics import Metrics, mean


def _group_stats(r: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group size n_g, group mean and group sum of squared deviations, each (N,).

    The mean of a group whose rewards are all equal is that reward exactly (no float round-off), so
    such groups get exactly zero deviation and zero advantage.
    """
    _, g = torch.unique(group_ids, return_inverse=True)  # (N,) in [0, G)
    num_groups = int(g.max().item()) + 1
    zeros = torch.zeros(num_groups, dtype=r.dtype, device=r.device)  # (G,)
    n = zeros.index_add(0, g, torch.ones_like(r))  # (G,), >= 1 for every group that exists
    mean = zeros.index_add(0, g, r) / n  # (G,)
    hi = zeros.scatter_reduce(0, g, r, "amax", include_self=False)  # (G,)
    lo = zeros.scatter_reduce(0, g, r, "amin", include_self=False)  # (G,)
    mean = torch.where(hi == lo, hi, mean)[g]  # (N,)
    sq_dev = zeros.index_add(0, g, (r - mean) ** 2)[g]  # (N,)
    return n[g], mean, sq_dev


def grpo(r: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps), std_g the unbiased (Bessel) group std.

    Shao et al. 2024, "DeepSeekMath" (as in TRL's GRPOTrainer). A group of size 1 or with zero reward
    variance carries no signal and gets exactly 0 (never NaN).
    """
    n, mean, sq_dev = _group_stats(r, group_ids)  # (N,) each
    std = torch.sqrt(sq_dev / (n - 1).clamp(min=1))  # (N,)
    has_signal = (n > 1) & (sq_dev > 0)
    return torch.where(has_signal, (r - mean) / (std + eps), torch.zeros_like(r))


def drgrpo(r: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO: A_i = r_i - mean_g, no division by the group std.

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective". `eps` is unused.
    """
    _, mean, _ = _group_stats(r, group_ids)
    return r - mean


def rloo(r: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i, j in g} r_j, the leave-one-out baseline.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs". A group of size 1 has no other sample and gets 0. `eps` is unused.
    """
    n, mean, _ = _group_stats(r, group_ids)
    # r_i - (n mean - r_i) / (n - 1) rewritten as n / (n - 1) (r_i - mean): exactly 0 on constant groups.
    return torch.where(n > 1, n / (n - 1).clamp(min=1) * (r - mean), torch.zeros_like(r))


def reinforce_pp(
    r: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, token_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE++ with a group baseline: a_i = r_i - mean_g, then whitened over the batch's tokens.

    Hu et al. 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward
    Models", as OpenRLHF's `reinforce_baseline` computes it: every valid token of sample i carries
    a_i (gamma = 1, the reward at the last token), and the advantages are whitened over all valid
    tokens of the batch with the population variance, A = (a - mu) / sqrt(max(var, 1e-8)). Per
    sample with n_i = `token_counts` (valid tokens; 1 each when None):
    mu = sum_i n_i a_i / sum_i n_i, var = sum_i n_i (a_i - mu)^2 / sum_i n_i. All 0 when every a_i
    is equal. `eps` is unused.
    """
    a = drgrpo(r, group_ids)  # (N,)
    n = torch.ones_like(a) if token_counts is None else token_counts.to(a)  # (N,)
    if a.numel() == 0 or bool((a == a[0]).all()) or float(n.sum()) == 0:
        return torch.zeros_like(a)
    mu = (n * a).sum() / n.sum()
    var = (n * (a - mu) ** 2).sum() / n.sum()
    return (a - mu) * var.clamp(min=1e-8).rsqrt()


ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo,
    "drgrpo": drgrpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
}


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    estimator: str,
    eps: float = 1e-6,
    token_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Advantages (N,) of `rewards` (N,) grouped by `group_ids` (N,), and summary metrics.

    `estimator` is a key of `ESTIMATORS` (`grpo`, `drgrpo`, `rloo`, `reinforce_pp`); `token_counts`
    (N,), each sample's trained tokens, weighs REINFORCE++'s token-level whitening.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; known: {', '.join(sorted(ESTIMATORS))}")
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (N,)")
    r = rewards.detach().float()
    if r.numel() == 0:
        adv = r
    else:
        fn = ESTIMATORS[estimator]
        extra = {"token_counts": token_counts} if fn is reinforce_pp else {}
        adv = fn(r, group_ids.to(r.device), eps, **extra)
    n = float(adv.numel())
    metrics = {
        "train/advantage_mean": mean(adv.mean().item() if adv.numel() else 0.0, n),
        "train/advantage_std": mean(adv.std().item() if adv.numel() > 1 else 0.0, n),
        "train/advantage_abs_mean": mean(adv.abs().mean().item() if adv.numel() else 0.0, n),
    }
    return adv, metrics
