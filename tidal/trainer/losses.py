"""RL policy losses as pure tensor functions.

Conventions. Per-token tensors are (B, T) and aligned with the token at position t, i.e. the token
predicted from the logits at position t - 1 (so position 0 is never a target). `mask` (B, T) is 1 on
trained response tokens and 0 on prompt and padding. Values at masked positions never reach a
result, even when they are -inf or NaN: they are replaced with `torch.where` before any product or
sum, because `0 * inf = nan`. Metrics are `tidal.telemetry.metrics.Stat`s of detached 0-dim float tensors,
each declaring how it merges over micro-batches and ranks: a mean over valid tokens carries their
count as its weight, a maximum or minimum says so. With no valid token every metric and every loss
is 0.

Ratios: r = pi / pi_old (the PPO ratio, pi_old the trainer's recomputed "proximal" policy) and
k = pi_old / mu (mu the behavior policy that sampled the rollout, off by stale weights and by
inference-engine numerics). The correction weighs each token by a function of k; the trust region
bounds how far r may move: PPO's clip (`ppo_clip_loss`) or M2PO's mask (`m2po_loss`, with the mask
computed over the whole rollout batch by `tidal.trainer.offpolicy.m2po_mask`).
"""

from __future__ import annotations

import torch

from tidal.config import (
    BehaviorCorrection,
    ClipTrustRegion,
    LossConfig,
    M2POTrustRegion,
    MaskCorrection,
    NoCorrection,
    TISCorrection,
)
from tidal.model.routing import expert_load
from tidal.telemetry.metrics import Metrics, Stat, largest, mean, smallest

Correction = NoCorrection | BehaviorCorrection | TISCorrection | MaskCorrection

# Which of logp_old / logp_mu each correction needs.
_NEEDS: dict[str, tuple[str, ...]] = {
    "none": ("logp_old",),
    "behavior": ("logp_mu",),
    "tis": ("logp_old", "logp_mu"),
    "mask": ("logp_old", "logp_mu"),
}

# Bound on |log r| before exp (as verl does): keeps r finite, so -r * A never becomes inf or 0 * inf.
_MAX_LOG_RATIO = 20.0


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> Stat:
    """Detached mean of x over the True entries of `valid` (0 when there are none), weighted by their count."""
    x = x.detach().float()
    n = valid.sum()
    total = torch.where(valid, x, torch.zeros_like(x)).sum()
    return mean(total / n.clamp(min=1), n.float())


def _masked_max(x: torch.Tensor, valid: torch.Tensor) -> Stat:
    """Detached max of x over the True entries of `valid` (0 when there are none)."""
    x = x.detach().float()
    if x.numel() == 0:
        return largest(x.new_zeros(()))
    top = torch.where(valid, x, -torch.inf).max()
    return largest(torch.where(valid.any(), top, 0.0))  # no host sync


def importance_weights(
    logp_old: torch.Tensor,
    logp_mu: torch.Tensor,
    mask: torch.Tensor,
    correction: Correction,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Off-policy weight w (B, T) on the surrogate, from k = pi_old / mu = exp(logp_old - logp_mu).

    Levels of k: `token` k_t; `sequence` the true sequence IS ratio prod_t k_t (log k summed over the
    sequence's valid tokens); `geometric` the per-sequence geometric mean (log k averaged over valid
    tokens, which stays O(1) on long sequences where the product explodes, TRL #5814). Sequence
    levels are broadcast to their tokens.

    - `tis`: w = min(k, c), truncated IS (Yao et al. 2025, "Your Efficient RL Framework Secretly
      Brings You Off-Policy RL Training"); with pi_old as the proximal policy, w * clip-loss(r) is
      the decoupled PPO objective (Fu et al. 2025, "AReaL").
    - `mask`: w = k if low <= k <= high else 0, masked IS (IcePop, Ling team 2025; MIS).
    - `none`, `behavior`: w = 1.

    w is detached and 0 at masked positions. logp_mu = -inf (mu never samples the token) is k = +inf:
    `tis` gives c, `mask` gives 0.

    Metrics: `offpolicy/is_weight_mean`, `offpolicy/is_weight_max` (of w); `offpolicy/frac_truncated`
    (tis: k > c) and `offpolicy/frac_masked` (mask: k outside [low, high]), 0 for other corrections;
    `offpolicy/log_ratio_abs_mean`, `offpolicy/log_ratio_abs_max` of |logp_old - logp_mu| over the
    valid tokens where it is finite. With the per-token `entropy` (B, T) of pi:
    `offpolicy/truncated_token_entropy`, its mean over the tokens the correction truncates (tis) or
    masks (mask), weighted by their count (0 with weight 0 when there are none).
    """
    valid = mask.bool()  # (B, T)
    with torch.no_grad():
        log_k = torch.where(valid, logp_old.float() - logp_mu.float(), 0.0)  # (B, T)
        level = getattr(correction, "level", "token")
        if level == "sequence":
            log_k = log_k.sum(-1, keepdim=True).expand_as(log_k)
        elif level == "geometric":
            n = valid.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
            log_k = (log_k.sum(-1, keepdim=True) / n).expand_as(log_k)
        elif level != "token":
            raise ValueError(f"unknown importance level {level!r}; known: token, sequence, geometric")
        k = torch.exp(log_k)  # (B, T), may be +inf
        out_of_range = torch.zeros_like(valid)
        if isinstance(correction, TISCorrection):
            out_of_range = k > correction.c
            w = k.clamp(max=correction.c)
        elif isinstance(correction, MaskCorrection):
            out_of_range = (k < correction.low) | (k > correction.high)
            w = torch.where(out_of_range, 0.0, k)
        elif isinstance(correction, NoCorrection | BehaviorCorrection):
            w = torch.ones_like(k)
        else:
            raise ValueError(f"unknown correction {correction!r}; known: none, behavior, tis, mask")
        w = torch.where(valid, w, 0.0)  # (B, T)
        frac = _masked_mean(out_of_range.float(), valid)
        none = mean(torch.zeros_like(frac.value), frac.weight)
        abs_log_ratio = (logp_old.float() - logp_mu.float()).abs()  # (B, T)
        finite = valid & torch.isfinite(abs_log_ratio)
    metrics = {
        "offpolicy/is_weight_mean": _masked_mean(w, valid),
        "offpolicy/is_weight_max": _masked_max(w, valid),
        "offpolicy/frac_truncated": frac if isinstance(correction, TISCorrection) else none,
        "offpolicy/frac_masked": frac if isinstance(correction, MaskCorrection) else none,
        "offpolicy/log_ratio_abs_mean": _masked_mean(abs_log_ratio, finite),
        "offpolicy/log_ratio_abs_max": _masked_max(abs_log_ratio, finite),
    }
    if entropy is not None:
        metrics["offpolicy/truncated_token_entropy"] = _masked_mean(entropy, valid & out_of_range)
    return w, metrics


def policy_ratio(logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor, ratio: str = "token") -> torch.Tensor:
    """The ratio r (B, T) of the surrogate, with grad through logp (values at masked positions unused).

    `ratio="token"`: r_t = exp(logp_t - logp_old_t). `ratio="sequence"`: GSPO (Zheng et al. 2025,
    "Group Sequence Policy Optimization"), s_i = exp(mean over the sequence's valid tokens of
    logp - logp_old), the length-normalised ratio (a sum would explode on long sequences); used in the
    GSPO-token form r_t = sg[s_i] * exp(logp_t - sg[logp_t]), whose value is s_i and whose gradient
    flows per token. |log r| is bounded by 20 before exp.
    """
    valid = mask.bool()  # (B, T)
    logp_safe = torch.where(valid, logp, 0.0)  # (B, T)
    log_r = torch.where(valid, logp - logp_old, 0.0)  # (B, T)
    if ratio == "sequence":
        n = valid.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
        log_s = log_r.sum(-1, keepdim=True) / n  # (B, 1)
        log_r = log_s.detach() + logp_safe - logp_safe.detach()  # (B, T), value log s_i
    elif ratio != "token":
        raise ValueError(f"unknown ratio {ratio!r}; known: token, sequence")
    return torch.exp(log_r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))


def _cut_token_metrics(cut: torch.Tensor, A: torch.Tensor, entropy: torch.Tensor | None) -> Metrics:
    """Who the trust region takes out of the gradient (`cut` (B, T) bool, valid tokens only): the share
    of them with A > 0 (the clip's other ones have A < 0: it never clips A = 0) and their mean entropy."""
    metrics = {"offpolicy/clipped_pos_adv_frac": _masked_mean((A > 0).float(), cut)}
    if entropy is not None:
        metrics["offpolicy/clipped_token_entropy"] = _masked_mean(entropy, cut)
    return metrics


def ppo_clip_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    ratio: str = "token",
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate per token: max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A), (B, T).

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; asymmetric eps_high is DAPO's
    clip-higher (Yu et al. 2025). r per token or GSPO's per sequence (`policy_ratio`). `dual_clip`
    c > 1: where A < 0 the loss is min(loss, -c A) (Ye et al. 2020, "Mastering Complex Control in MOBA
    Games with Deep RL", dual-clip PPO). Zero at masked positions.

    Metrics: `train/clip_frac` (valid tokens where the clipped term is taken and differs from the
    unclipped one, so their gradient is 0), `train/dual_clip_frac`, `train/ratio_mean`,
    `train/ratio_max`; over the clipped tokens (as in `train/clip_frac`, weighted by their count, 0 with
    weight 0 when none): `offpolicy/clipped_pos_adv_frac`, the share with A > 0 (clipped above
    1 + eps_high) rather than A < 0 (below 1 - eps_low), and with the per-token `entropy` (B, T)
    `offpolicy/clipped_token_entropy`, their mean entropy (to set beside `train/entropy`: clipping
    that prunes high-entropy tokens under staleness is what M2PO's paper blames).
    """
    valid = mask.bool()  # (B, T)
    r = policy_ratio(logp, logp_old, mask, ratio)  # (B, T)
    A = torch.where(valid, advantages, 0.0).to(r.dtype)  # (B, T)
    unclipped = -r * A
    clipped = -r.clamp(1.0 - eps_low, 1.0 + eps_high) * A
    loss = torch.maximum(unclipped, clipped)  # (B, T)
    clip_taken = clipped > unclipped
    dual_taken = torch.zeros_like(valid)
    if dual_clip is not None:
        bound = -dual_clip * A  # (B, T)
        dual_taken = (A < 0) & (loss > bound)
        loss = torch.where(dual_taken, bound, loss)
    loss = torch.where(valid, loss, 0.0)
    metrics = {
        "train/clip_frac": _masked_mean(clip_taken.float(), valid),
        "train/dual_clip_frac": _masked_mean(dual_taken.float(), valid),
        "train/ratio_mean": _masked_mean(r, valid),
        "train/ratio_max": _masked_max(r, valid),
    }
    metrics |= _cut_token_metrics(valid & clip_taken, A, entropy)
    return loss, metrics


def m2po_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor,
    ratio: str = "token",
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """M2PO's surrogate per token: -M r A, (B, T), no clipping.

    Zheng, Zhao, Chen 2025, "Prosperity before Collapse: How Far Can Off-Policy RL Reach with Stale
    Data on LLMs?" (arXiv 2510.01161): the trust region is the second-moment mask M = `keep` (B, T),
    True on the tokens kept, computed once over the whole rollout batch by
    `tidal.trainer.offpolicy.m2po_mask`; the kept tokens get the plain importance-weighted policy
    gradient r A, the dropped ones none. r as in `policy_ratio` (with `ratio="sequence"` the value s_i
    still averages over all the sequence's valid tokens, dropped ones included). Zero at masked and
    dropped positions.

    Metrics: `train/ratio_mean`, `train/ratio_max` (over valid tokens), and over the dropped valid
    tokens (weighted by their count) `offpolicy/clipped_pos_adv_frac` and, with `entropy`,
    `offpolicy/clipped_token_entropy`, as for PPO's clipped tokens.
    """
    valid = mask.bool()  # (B, T)
    kept = valid & keep.bool()  # (B, T)
    r = policy_ratio(logp, logp_old, mask, ratio)  # (B, T)
    A = torch.where(valid, advantages, 0.0).to(r.dtype)  # (B, T)
    loss = torch.where(kept, -r * A, 0.0)  # (B, T)
    metrics = {"train/ratio_mean": _masked_mean(r, valid), "train/ratio_max": _masked_max(r, valid)}
    metrics |= _cut_token_metrics(valid & ~kept, A, entropy)
    return loss, metrics


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimator of KL(pi || pi_ref) from tokens sampled from pi, (B, T).

    Schulman 2020, "Approximating KL Divergence": with log rho = logp_ref - logp,
    k1 = -log rho (unbiased, high variance), k2 = (log rho)^2 / 2 (biased, low variance),
    k3 = rho - 1 - log rho (unbiased, low variance, always >= 0). Differentiable in logp.
    """
    log_rho = logp_ref - logp  # (B, T)
    if kind == "k1":
        return -log_rho
    if kind == "k2":
        return 0.5 * log_rho**2
    if kind == "k3":
        return torch.exp(log_rho) - log_rho - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; known: k1, k2, k3")


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor | None,
    logp_mu: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    keep: torch.Tensor | None = None,
    logp_ref: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Per-token policy loss (B, T): w * surrogate(r) + beta KL(pi || pi_ref) - alpha H(pi).

    The correction picks r and w. `none`: r = pi / pi_old, w = 1. `behavior`: r = pi / mu (mu is the
    proximal policy, no recompute; logp_old may be None), w = 1. `tis` / `mask`: r = pi / pi_old and
    w = importance_weights(pi_old, mu), applied always (AReaL drops it unless an option is set; we do
    not). The trust region picks the surrogate: `clip`, PPO's `ppo_clip_loss`; `m2po`, `m2po_loss`
    with `keep` (B, T), the batch's M2PO mask from `tidal.trainer.offpolicy.m2po_mask` (required). With
    `tis` and a large c, m2po's w * M r A is the paper's M (pi / mu) A. The KL term is added when
    cfg.kl.coef > 0 (logp_ref required), the entropy bonus when cfg.entropy_coef > 0 (entropy required).
    Zero at masked positions.

    Metrics: those of the surrogate and `importance_weights`, plus `train/pg_loss` (w * surrogate),
    `train/kl` (when logp_ref is given) and `train/entropy` (when entropy is given).
    """
    corr = cfg.correction
    given = {"logp_old": logp_old, "logp_mu": logp_mu}
    missing = [name for name in _NEEDS[corr.type] if given[name] is None]
    if missing:
        raise ValueError(f"loss.correction.type={corr.type!r} needs {' and '.join(missing)}")
    if cfg.kl.coef > 0 and logp_ref is None:
        raise ValueError("loss.kl.coef > 0 needs logp_ref (reference log-probs); set loss.kl.coef=0 or pass them")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("loss.entropy_coef > 0 needs the per-token entropy; set loss.entropy_coef=0 or pass it")
    # behavior bypasses the recompute: mu is the proximal policy of the PPO ratio.
    prox = logp_mu if isinstance(corr, BehaviorCorrection) else logp_old
    assert prox is not None  # checked above
    valid = mask.bool()  # (B, T)
    H = entropy.detach() if entropy is not None else None
    trust = cfg.trust_region
    if isinstance(trust, M2POTrustRegion):
        if keep is None:
            raise ValueError("loss.trust_region.type='m2po' needs `keep`, the rollout batch's mask from m2po_mask")
        surrogate, metrics = m2po_loss(logp, prox, advantages, mask, keep, cfg.ratio, entropy=H)  # (B, T)
    elif isinstance(trust, ClipTrustRegion):
        surrogate, metrics = ppo_clip_loss(
            logp, prox, advantages, mask, trust.eps_low, trust.eps_high, trust.dual_clip, cfg.ratio, entropy=H
        )
    else:
        raise ValueError(f"unknown trust region {trust!r}; known: clip, m2po")
    # none / behavior may lack one of pi_old, mu; their weight is 1 whatever k is, so use k = 1 then.
    old = logp_old if logp_old is not None else prox
    mu = logp_mu if logp_mu is not None else prox
    w, w_metrics = importance_weights(old, mu, mask, corr, entropy=H)  # (B, T)
    pg = w * surrogate  # (B, T), both 0 at masked positions
    metrics |= w_metrics
    metrics["train/pg_loss"] = _masked_mean(pg, valid)
    per_token = pg
    if logp_ref is not None:
        kl = kl_penalty(torch.where(valid, logp, 0.0), torch.where(valid, logp_ref, 0.0), cfg.kl.type)  # (B, T)
        metrics["train/kl"] = _masked_mean(kl, valid)
        if cfg.kl.coef > 0:
            per_token = per_token + cfg.kl.coef * kl
    if entropy is not None:
        H = torch.where(valid, entropy, 0.0)  # (B, T)
        metrics["train/entropy"] = _masked_mean(H, valid)
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * H
    return torch.where(valid, per_token, 0.0), metrics


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(numerator, denominator) of the batch loss; both are additive over row splits of the batch.

    Sum the numerators and denominators of the micro-batches, then divide, to get the full-batch loss.
    `token-mean`: sum of valid token losses / number of valid tokens. `sequence-mean`: sum over
    sequences of their token mean / number of sequences with a valid token. `constant`: sum / (B *
    max_len), Dr. GRPO's length-unbiased constant normaliser (Liu et al. 2025); needs max_len.
    """
    valid = mask.bool()  # (B, T)
    x = torch.where(valid, per_token, 0.0)  # (B, T)
    if mode == "token-mean":
        return x.sum(), float(valid.sum().item())
    if mode == "sequence-mean":
        n = valid.sum(-1)  # (B,)
        return (x.sum(-1) / n.clamp(min=1)).sum(), float((n > 0).sum().item())
    if mode == "constant":
        if max_len is None:
            raise ValueError("aggregation 'constant' needs max_len (rollout.max_new_tokens)")
        return x.sum(), float(per_token.shape[0] * max_len)
    raise ValueError(f"unknown aggregation {mode!r}; known: token-mean, sequence-mean, constant")


def expert_load_stats(picked: torch.Tensor, keep: torch.Tensor | None, num_experts: int) -> Metrics:
    """How evenly the tokens were routed: `moe/expert_load_max` and `moe/expert_load_min`, the max and
    min over MoE layers l and experts e of load_{l,e} = (slots of layer l's kept tokens sent to e) /
    (kept tokens * top_k / E), relative to a uniform share (1.0 everywhere = balanced, E / top_k = every
    token to the same experts). `picked` (N, L, k) holds the experts the N tokens were routed to in
    each MoE layer, as `tidal.model.routing.RoutingRecorder` records them: the model's real choice (softmax
    top-k on Qwen3-MoE; sigmoid plus correction bias, by groups, on GLM), or the replayed one under R3.
    `keep` (N,) drops padding. Over micro-batches they merge as the max and min of their extremes."""
    kept = picked if keep is None else picked[keep.to(picked.device)]  # (n, L, k)
    slots = max(kept.shape[0] * kept.shape[-1], 1)
    load = expert_load(kept, num_experts) * num_experts / slots  # (L, E)
    return {"moe/expert_load_max": largest(load.max()), "moe/expert_load_min": smallest(load.min())}


def switch_aux_loss(
    router_logits: tuple[torch.Tensor, ...], picked: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor, Metrics]:
    """Switch-Transformer load-balancing loss, Qwen3-MoE's own (transformers' `load_balancing_loss_func`).

    Fedus et al. 2021, "Switch Transformers", eqs. (4)-(6). `router_logits` holds one (N, E) tensor
    per MoE layer, `picked` (N, L, k) the experts the N tokens were routed to, `keep` (N,) or (B, T)
    the tokens that count (padding excluded). Over all layers' kept tokens, f_e = (top-k assignments to
    expert e) / tokens, so sum_e f_e = k, and P_e = mean softmax probability of e; loss = E * sum_e
    f_e P_e, which is k at perfectly uniform routing. Without routing replay `picked` is the softmax
    top-k of the logits and this is transformers' value; with it, f counts the replayed experts, where
    the tokens went. Metric `moe/aux_loss`, a mean weighted by kept tokens.
    """
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    keep = keep.reshape(-1).to(device) if keep is not None else None  # (N,)
    kept = picked if keep is None else picked[keep.to(picked.device)]  # (n, L, k)
    n = torch.tensor(float(kept.shape[0]), device=device)
    f = expert_load(kept, num_experts).to(device) / n.clamp(min=1)  # (L, E)
    prob_sums = []
    for layer in router_logits:
        probs = torch.softmax(layer.float(), dim=-1)  # (N, E)
        prob_sums.append((torch.where(keep[:, None], probs, 0.0) if keep is not None else probs).sum(0))  # (E,)
    P = torch.stack(prob_sums) / n.clamp(min=1)  # (L, E)
    loss = num_experts * (f.mean(0) * P.mean(0)).sum()
    return loss, {"moe/aux_loss": mean(loss.detach(), n)}


def sequence_aux_loss(
    router_logits: tuple[torch.Tensor, ...], picked: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, Metrics]:
    """Sequence-wise balance loss of sigmoid-scored routers (GLM-4.5, GLM-5), DeepSeek-V3's.

    DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", eqs. (17)-(20); GLM-4.5 trains with it (weight
    1e-4) beside the correction-bias update (`router_bias_update_rate`). `router_logits` holds one
    (B*T, E) tensor per MoE layer, `picked` (B*T, L, k) the experts the tokens were routed to (chosen by
    score plus correction bias, in groups), `keep` (B, T) the tokens that count. For each sequence of
    T_b kept tokens and each layer: f_i = E / (k T_b) * (tokens routed to i), P_i = mean over its tokens
    of s'_i = sigmoid(z_i) / sum_j sigmoid(z_j); its loss is sum_i f_i P_i, 1 at perfect balance. The
    loss is the mean over layers and over sequences with a kept token; metric `moe/aux_loss`, a mean
    weighted by those sequences. A softmax-based loss (`switch_aux_loss`) would balance probabilities
    these routers never compute.
    """
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    w = keep.to(device)  # (B, T)
    B, T = w.shape
    k = picked.shape[-1]
    tokens = w.sum(-1).float()  # (B,)
    per_layer = []
    for layer, z in enumerate(router_logits):
        scores = z.float().sigmoid()  # (B*T, E)
        s = torch.where(w[..., None], (scores / scores.sum(-1, keepdim=True)).view(B, T, num_experts), 0.0)
        P = s.sum(1) / tokens.clamp(min=1)[:, None]  # (B, E)
        hits = torch.nn.functional.one_hot(picked[:, layer].to(device).long(), num_experts).sum(1)  # (B*T, E)
        hits = torch.where(w[..., None], hits.view(B, T, num_experts), 0).sum(1).float()  # (B, E)
        f = hits * num_experts / (k * tokens.clamp(min=1)[:, None])  # (B, E)
        per_layer.append((f * P).sum(-1))  # (B,)
    sequences = (tokens > 0).sum().float()
    loss = torch.stack(per_layer).mean(0).sum() / sequences.clamp(min=1)  # sequences without tokens add 0
    return loss, {"moe/aux_loss": mean(loss.detach(), sequences)}
