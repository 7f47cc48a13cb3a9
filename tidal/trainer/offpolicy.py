"""Batch-level off-policy statistics and the M2PO mask: computed once per rollout batch, on the whole
batch, before it is split into minibatches and micro-batches.

Both read the log importance ratio log k = logp_old - logp_mu of the valid tokens (`mask` (B, T) is 1
on trained response tokens), k = pi_old / mu: pi_old is the trainer's recomputed policy before the
update, mu the behavior policy that sampled the rollout (stale weights, inference-engine numerics).
A valid token whose log k is not finite (mu gave its token probability 0, or a NaN) is left out of
the statistics and always dropped by the M2PO mask. Statistics are computed in float64.

With several trainer ranks each rank calls them on the whole batch: pi_old is recomputed on each
rank's share and gathered, so every rank builds the same mask and the same statistics.
"""

from __future__ import annotations

import torch

from tidal.telemetry.metrics import Metrics, mean


def _log_k(logp_old: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log k (B, T) in float64, 0 where not finite or not valid; (B, T) bool: valid and finite)."""
    log_k = logp_old.detach().double() - logp_mu.detach().double()
    finite = mask.bool() & torch.isfinite(log_k)
    return torch.where(finite, log_k, 0.0), finite


def offpolicy_stats(
    logp_old: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor, ages: torch.Tensor | None = None
) -> Metrics:
    """How far the batch's behavior policy mu is from pi_old, over the valid tokens with a finite log k.

    - `offpolicy/m2`: the second moment of the log ratio, M2 = mean (log k)^2, M2PO's measure of
      the distribution shift (Zheng et al. 2025, "Prosperity before Collapse: How Far Can Off-Policy
      RL Reach with Stale Data on LLMs?"); unlike the mean of log k (a KL estimate), positive and
      negative log ratios do not cancel in it.
    - `offpolicy/ess`: the effective sample size of the token IS weights k, normalised to (0, 1]:
      (sum k)^2 / (n sum k^2) (Kish's effective sample size over n), 1 when every k is equal
      (on-policy: all 1), 1/n when one weight dominates. Computed with logsumexp: no overflow.

    - `offpolicy/m2_per_version` (with `ages` (B, T), each token's staleness in versions): M2 over the
      mean squared age of the same tokens, the M2 a batch exactly one version stale would have if
      log k grows in proportion to the versions between mu and pi_old (a steady drift). The adaptive
      staleness bound predicts M2 at staleness k as this times k^2. Left out when no token is stale;
      tokens of age 0 still count in M2 (the engines' numerical mismatch), which errs on the side of a
      larger rate and so a tighter bound.

    All are means over n tokens (weight n); all are 0 with weight 0 when no token counts. A batch of
    several rollout batches would merge `ess` as a token-weighted mean of batch values, not as the ESS
    of the union (it is computed once per rollout batch, where no merge happens).
    """
    log_k, finite = _log_k(logp_old, logp_mu, mask)  # (B, T)
    n = finite.sum()
    m2 = (log_k**2).sum() / n.clamp(min=1)
    x = log_k[finite]  # (n,)
    if x.numel() == 0:
        ess = torch.zeros((), dtype=torch.float64)
    else:  # log of (sum k)^2 / (n sum k^2)
        ess = torch.exp(2 * torch.logsumexp(x, 0) - torch.log(n.double()) - torch.logsumexp(2 * x, 0))
    out = {"offpolicy/m2": mean(m2.float(), n.float()), "offpolicy/ess": mean(ess.float(), n.float())}
    if ages is not None:
        age_sq = (ages.double() ** 2)[finite].sum()
        if age_sq > 0:
            out["offpolicy/m2_per_version"] = mean(float((log_k**2).sum() / age_sq), float(n))
    return out


def m2po_mask(
    logp_old: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, Metrics]:
    """M2PO's second-moment trust region over one rollout batch: keep (B, T) bool, and its metrics.

    Zheng, Zhao, Chen 2025, "Prosperity before Collapse: How Far Can Off-Policy RL Reach with Stale
    Data on LLMs?" (arXiv 2510.01161), M2PO. With the per-token log ratio log k_i = log pi_old(a_i|s_i)
    - log mu(a_i|s_i) over the N valid tokens of the whole batch and M2 = (1/N) sum_i (log k_i)^2,
    the tokens with the largest (log k_i)^2 (equivalently the largest |log k_i|) are dropped one by one
    until the M2 of the kept tokens is at most `threshold` (tau). Dropping the largest term never
    raises the mean of the rest, so this keeps the largest prefix, in ascending order of (log k)^2, whose
    mean is <= tau: sort descending, take the suffix means, drop everything before the first suffix
    mean <= tau. If even the smallest (log k_i)^2 exceeds tau, every token is dropped (no update).
    Ties are broken by a stable sort, so the mask is deterministic. Tokens with a non-finite log k are
    dropped first.

    Where: the paper's log ratio is log(pi_theta / mu). The trainer calls this once per rollout batch
    right after recomputing pi_old, before any optimizer step, where pi_theta = pi_old; so the mask is
    computed from log(pi_old / mu) on the whole batch (not per minibatch or micro-batch) and every
    minibatch step reuses it. The trust-region loss (`tidal.trainer.losses.m2po_loss`) then applies
    M r A without clipping on the kept tokens.

    AReaL (`_apply_m2po_masking` in areal/trainer/ppo/actor.py) builds the same mask from
    log(pi_prox / mu), pi_prox its recomputed pi_old, but inside the loss function, so per micro-batch
    and per data-parallel rank; it stops at a strict < tau and keeps the one smallest token when every
    suffix mean exceeds tau.

    keep is True on the valid tokens kept, False on dropped ones and on padding. Metrics:
    `offpolicy/m2_masked_frac` (dropped / valid tokens) and `offpolicy/m2_kept` (the M2 of the kept
    tokens, <= tau), means over valid and kept tokens.
    """
    if threshold <= 0:
        raise ValueError(f"M2PO threshold must be > 0, got {threshold}")
    valid = mask.bool()  # (B, T)
    log_k, finite = _log_k(logp_old, logp_mu, mask)
    sq = torch.where(finite, log_k**2, torch.inf)[valid]  # (N,), the valid tokens in row-major order
    n = sq.numel()
    keep = torch.zeros_like(valid)
    if n == 0:
        zero = torch.zeros(())
        return keep, {"offpolicy/m2_masked_frac": mean(zero, zero), "offpolicy/m2_kept": mean(zero, zero)}
    ordered, order = torch.sort(sq, descending=True, stable=True)  # (N,)
    # Suffix sums from the small end, so an infinite value only reaches the suffixes that contain it.
    counts = torch.arange(n, 0, -1, device=sq.device, dtype=sq.dtype)  # (N,)
    suffix_mean = ordered.flip(0).cumsum(0).flip(0) / counts  # (N,), non-increasing
    within = (suffix_mean <= threshold).int().cummax(0).values  # (N,), 0...0 1...1 (robust to rounding)
    n_drop = n - within.sum()  # () tensor: no host sync
    kept_sorted = torch.arange(n, device=sq.device) >= n_drop  # (N,)
    kept = torch.empty_like(kept_sorted)
    kept[order] = kept_sorted
    keep[valid] = kept
    n_kept = kept.sum()
    kept_m2 = torch.where(kept, sq, 0.0).sum() / n_kept.clamp(min=1)
    metrics = {
        "offpolicy/m2_masked_frac": mean(n_drop.float() / n, torch.tensor(float(n))),
        "offpolicy/m2_kept": mean(kept_m2.float(), n_kept.float()),
    }
    return keep, metrics
