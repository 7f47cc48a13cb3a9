"""The config sections of the RL algorithm: weight sync, losses and corrections, filters, rewards, envs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tidal.config.base import DataConfig, ModelConfig, Strict, _with_default_tag

# -------------------------------------------------------------------------------------- weight sync


class ObjectStoreSync(Strict):
    type: Literal["object_store"] = "object_store"
    """Snapshots go through the Ray object store (works across nodes; the default)."""


class BroadcastSync(Strict):
    type: Literal["broadcast"] = "broadcast"
    """torch.distributed broadcast in buckets from the trainer to every worker (gloo on CPU, NCCL on
    GPU) in a process group of their own; metadata goes through Ray."""
    backend: Literal["gloo", "nccl"] | None = None
    """Backend of the weight-sync group (default: nccl with CUDA, gloo otherwise)."""
    timeout_s: float = Field(600.0, gt=0.0)
    """Longest wait of one broadcast; past it the sync fails with an error instead of hanging."""


class DiskSync(Strict):
    type: Literal["disk"] = "disk"
    """safetensors files on a disk the workers share with the trainer (for engines that load
    weights from disk)."""
    dir: str | None = None
    """Directory of the snapshot files (default: `<run_dir>/weights`)."""
    keep: int = Field(3, ge=1)
    """Snapshot files kept; older ones are deleted."""


class WeightSyncConfig(Strict):
    every: int = Field(1, ge=1)
    """Publish a snapshot every this many trainer steps (the `sync_every` of other frameworks).
    Workers then lag up to every - 1 steps behind, which must fit in `rollout.max_staleness`."""
    transport: Annotated[ObjectStoreSync | BroadcastSync | DiskSync, Field(discriminator="type")] = ObjectStoreSync()
    """How snapshots travel; `type` picks it (`object_store`, `broadcast` or `disk`)."""
    bucket_mb: float = Field(256.0, gt=0.0)
    """A publish streams the weights in buckets of at most this many MB (a larger tensor travels
    alone): the trainer gathers, casts and sends one bucket at a time, never a whole copy of the
    model; the broadcast transport sends each bucket as one collective."""

    @model_validator(mode="before")
    @classmethod
    def _default_tag(cls, data: Any) -> Any:
        return _with_default_tag(data, "transport", "object_store")


# ------------------------------------------------------------------------------------------ algorithm


class NoCorrection(Strict):
    type: Literal["none"] = "none"
    """The trust region on r = pi/pi_old alone, ignoring the behavior policy (the baseline)."""


class BehaviorCorrection(Strict):
    type: Literal["behavior"] = "behavior"
    """The trust region on r = pi/mu, the behavior log-probs as the proximal policy (no recompute)."""


class TISCorrection(Strict):
    type: Literal["tis"] = "tis"
    """Truncated importance sampling: weight min(k, c) on the surrogate, k = pi_old/mu (Yao et al.
    2025); with the recomputed pi_old as proximal policy this is decoupled PPO (Fu et al. 2025)."""
    level: Literal["token", "sequence", "geometric"] = "token"
    """k per token, per sequence (product of token ratios) or as the per-sequence geometric mean."""
    c: float = Field(2.0, gt=0.0)
    """Truncation bound C."""


class MaskCorrection(Strict):
    type: Literal["mask"] = "mask"
    """Masked importance sampling (IcePop): weight k inside [low, high], 0 outside."""
    level: Literal["token", "sequence", "geometric"] = "token"
    """k per token, per sequence (product of token ratios) or as the per-sequence geometric mean."""
    low: float = Field(0.5, ge=0.0)
    """Lower bound of k."""
    high: float = Field(2.0, gt=0.0)
    """Upper bound of k."""

    @model_validator(mode="after")
    def _bounds(self) -> MaskCorrection:
        if self.low >= self.high:
            raise ValueError(f"correction low={self.low} must be below high={self.high}")
        return self


Correction = Annotated[NoCorrection | BehaviorCorrection | TISCorrection | MaskCorrection, Field(discriminator="type")]


class ClipTrustRegion(Strict):
    type: Literal["clip"] = "clip"
    """PPO's clipped surrogate on r = pi/pi_old (Schulman et al. 2017), with DAPO's clip-higher and an
    optional dual clip."""
    eps_low: float = Field(0.2, ge=0.0)
    """r is clipped below at 1 - eps_low."""
    eps_high: float = Field(0.28, ge=0.0)
    """r is clipped above at 1 + eps_high (DAPO's clip-higher)."""
    dual_clip: float | None = Field(None, gt=1.0)
    """Dual clip c > 1: for negative advantages the loss is bounded by -c * A (null: off)."""


class M2POTrustRegion(Strict):
    type: Literal["m2po"] = "m2po"
    """M2PO's second-moment trust region (Zheng et al. 2025): per rollout batch, the tokens with the
    largest |log(pi_old/mu)| are masked until the mean of (log(pi_old/mu))^2 over the kept ones is at
    most `threshold`; the kept tokens get the unclipped importance-weighted gradient r * A."""
    threshold: float = Field(0.04, gt=0.0)
    """Bound tau on the second moment of the kept tokens' log(pi_old/mu) (the paper's 0.04)."""


TrustRegion = Annotated[ClipTrustRegion | M2POTrustRegion, Field(discriminator="type")]

# Keys that moved from `algorithm.loss` into `algorithm.loss.trust_region` (type clip).
_MOVED_TO_TRUST_REGION = ("eps_low", "eps_high", "dual_clip")


class KLConfig(Strict):
    coef: float = Field(0.0, ge=0.0)
    """Weight of the KL penalty to the frozen reference (the warm start); 0 loads no reference."""
    type: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (Schulman's k1, k2, k3)."""


class LossConfig(Strict):
    correction: Correction = TISCorrection()
    """Off-policy correction between the behavior policy mu and the trainer's pi_old; `type` picks it."""
    ratio: Literal["token", "sequence"] = "token"
    """PPO ratio r per token, or GSPO's per-sequence ratio (geometric mean of token ratios)."""
    trust_region: TrustRegion = ClipTrustRegion()
    """How far the update may move from pi_old: PPO's clip (`clip`, the default) or M2PO's
    second-moment mask (`m2po`); `type` picks it."""
    aggregation: Literal["token-mean", "sequence-mean", "constant"] = "token-mean"
    """Token mean over the batch, mean of per-sequence means, or Dr. GRPO's sum / (sequences x
    rollout.max_new_tokens)."""
    kl: KLConfig = KLConfig()
    """KL penalty to the reference policy."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (subtracted from the loss)."""
    router_aux_coef: float = Field(0.0, ge=0.0)
    """Weight of the MoE load-balancing (router aux) loss, each architecture's own over the experts
    the tokens were routed to: Switch's on Qwen3-MoE, DeepSeek-V3's sequence-wise one on the sigmoid
    scores on GLM-4.5 / GLM-5 (GLM-4.5 trained with 1e-4, beside `router_bias_update_rate`)."""
    router_bias_update_rate: float = Field(0.0, ge=0.0)
    """GLM-4.5 / GLM-5 load balancing without an auxiliary loss (DeepSeek-V3's; Megatron's
    `moe_router_bias_update_rate`, typically 1e-3): after each step each router's per-expert
    correction bias (`e_score_correction_bias`, which steers the choice of experts but not their
    weights) moves by this much toward balancing the step's expert load, and is published with the
    weights so rollout routes the same way. 0 keeps the biases frozen, right for RL on a released
    checkpoint. Needs routers with such a bias (the GLM presets)."""

    @model_validator(mode="before")
    @classmethod
    def _default_tag(cls, data: Any) -> Any:
        if isinstance(data, dict) and (moved := [k for k in _MOVED_TO_TRUST_REGION if k in data]):
            raise ValueError(
                f"algorithm.loss.{moved[0]} is now algorithm.loss.trust_region.{moved[0]} "
                "(trust_region type clip, the default)"
            )
        return _with_default_tag(_with_default_tag(data, "correction", "tis"), "trust_region", "clip")

    @model_validator(mode="after")
    def _m2po_needs_pi_old(self) -> LossConfig:
        if isinstance(self.trust_region, M2POTrustRegion) and isinstance(self.correction, BehaviorCorrection):
            raise ValueError(
                "algorithm.loss.trust_region type m2po masks by log(pi_old/mu) and needs the "
                "recomputed pi_old, which correction type behavior skips; use correction tis, "
                "mask or none"
            )
        return self


class DistillConfig(Strict):
    """On-policy distillation: a frozen teacher scores every token the policy samples, and
    coef * (log p_teacher - log mu) joins each token's advantage (the negative reverse-KL estimate at
    the sampled token, as in Thinking Machines' on-policy distillation)."""

    teacher: str
    """The teacher: a Hugging Face causal-LM directory (save_pretrained format, e.g. a run's
    `checkpoint/`), a run directory (its `checkpoint/` is taken), or an SFT run config (`.yaml`:
    that SFT run's checkpoint, trained on first use and cached, as `model.sft_warm_start`). It must
    share the policy's tokenizer and vocabulary size; it runs frozen in the trainer, held as the KL
    reference is (in the training dtype, partitioned over the ranks at ZeRO-3)."""
    coef: float = Field(1.0, gt=0.0)
    """Weight of the teacher's per-token signal log p_teacher - log mu in the advantage."""
    reward_coef: float = Field(1.0, ge=0.0)
    """Weight of the reward's advantage beside it. 0: distillation alone; the rewards still score every
    sample (for `reward/`, accuracy and the held-out evaluation) but train nothing. Without any reward
    to score (`rewards.functions: []`, no envs) the advantage is the teacher's alone as well."""

    @model_validator(mode="after")
    def _teacher_exists(self) -> DistillConfig:
        path = Path(self.teacher)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ValueError(f"algorithm.distill.teacher {self.teacher!r} is not a file; name an SFT run config")
        elif not (path / "config.json").is_file() and not (path / "checkpoint" / "config.json").is_file():
            raise ValueError(
                f"algorithm.distill.teacher {self.teacher!r} is neither a save_pretrained directory (with "
                "config.json), a run directory (with checkpoint/) nor an SFT run config (.yaml)"
            )
        return self

    def teacher_model(self) -> ModelConfig:
        """The teacher as a model section: `path` (a run directory's `checkpoint/`) or `sft_warm_start`."""
        path = Path(self.teacher)
        if path.suffix in (".yaml", ".yml"):
            return ModelConfig(sft_warm_start=self.teacher)
        return ModelConfig(path=str(path if (path / "config.json").is_file() else path / "checkpoint"))


class AlgorithmConfig(Strict):
    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce_pp"] = "grpo"
    """Advantage estimator: GRPO (group mean / std), Dr. GRPO (group mean only), RLOO (leave-one-out
    mean), REINFORCE++ with group baseline and batch normalisation."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per rollout batch (the batch is split into this many mini-batches; pi_old is
    recomputed once before the first)."""
    recompute_pi_old: Literal["auto", "always"] = "auto"
    """The proximal policy pi_old's log-probs. `always`: a no-grad forward of the whole batch before
    the update. `auto`: the same, except where that forward is redundant: with one minibatch and no
    M2PO mask (which needs pi_old before the update) the update's own forward runs on the very
    weights of pi_old, so its detached log-probs are pi_old's and the extra forward is skipped
    (about a fifth of a quickstart step); `perf/recompute_skipped` counts it. Off-policy metrics are
    the same either way (computed after the update from the same log-probs)."""
    routing_replay: Literal["none", "r3", "r2"] = "none"
    """MoE routing in the trainer. `r3` (rollout routing replay): every trainer forward of the
    policy (pi_old's and the update's) routes each token to the experts generation routed it to,
    in every MoE layer, with gate weights recomputed from the current router logits over those
    experts, so the routers still learn; it needs, and turns on, `rollout.record_routing`. `r2`
    (routing replay of pi_old): the update routes each token as the trainer's own pi_old forward
    routed it, so that later minibatches of a rollout batch (`minibatches` > 1) keep pi_old's
    experts; it needs a pi_old forward, so not `loss.correction: behavior`, and with one minibatch
    and `recompute_pi_old: auto` it is what the update does anyway. `none`: the trainer routes by
    itself (the `moe/routing_*` metrics, with record_routing, show how often that differs from
    generation)."""
    loss: LossConfig = LossConfig()
    """Policy loss, off-policy correction and regularisers."""
    distill: DistillConfig | None = None
    """On-policy distillation from a frozen teacher (`{teacher: PATH, coef: 1.0}`), beside the reward
    or alone (`reward_coef: 0`). None: off."""

    @model_validator(mode="after")
    def _r2_needs_pi_old(self) -> AlgorithmConfig:
        if self.routing_replay == "r2" and isinstance(self.loss.correction, BehaviorCorrection):
            raise ValueError(
                "algorithm.routing_replay=r2 replays the routing of the trainer's pi_old forward, and "
                "algorithm.loss.correction type behavior runs none: use r3, or another correction"
            )
        return self


class FilterConfig(Strict):
    zero_variance: bool = True
    """Dynamic sampling: drop groups whose rewards are all equal (no learning signal), counted. Off
    unless set with `algorithm.distill`: such a group still carries the teacher's signal."""
    drop_truncated: bool = False
    """Drop completions cut by rollout.max_new_tokens before advantages are computed, counted."""
    drop_failed_rewards: bool = False
    """Drop completions whose reward failed (raised, timed out, NaN) instead of scoring them with
    rewards.failure_reward, counted."""
    max_oversample: float = Field(0.0, ge=0.0)
    """Over-sampling (DAPO's dynamic sampling): each group a filter drops (or, streaming, that a slow
    worker made too stale to train) is replaced by a newly dispatched prompt, up to this fraction of
    `rollout.prompts_per_step` extra groups per batch, so a step still trains `prompts_per_step`
    groups. Counted in `rollout/oversampled_groups`. It costs what it adds: on the quickstart, where
    the zero-variance filter drops about half the groups, 1.0 doubles each step's rollout and training
    (0: off, a step trains the groups that pass)."""


# -------------------------------------------------------------------------------------------- rewards


class RewardSpec(Strict):
    name: str | None = None
    """A built-in reward by name: `exact_match`, `arithmetic`, `regex`, `math_verify`, `remote_judge`
    (a reward-model server or an LLM judge over HTTP)."""
    path: str | None = None
    """A user reward by import path (`my_pkg.rewards:fn`) or file path (`./my_reward.py:fn`)."""
    weight: float = 1.0
    """Weight in the sum of rewards."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments passed to the reward function."""

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.name is None) == (self.path is None):
            raise ValueError("a reward needs exactly one of `name` (a built-in) or `path` (module:function)")
        return self


class RewardsConfig(Strict):
    functions: list[RewardSpec] = [RewardSpec(name="arithmetic")]
    """Reward functions; a sample's reward is their weighted sum, each also logged as a sub-score."""
    timeout_s: float = Field(10.0, gt=0.0)
    """Time limit of one reward call; a call over it is recorded as failed. A sync reward past it is
    killed with the process it runs in (async ones are cancelled)."""
    retries: int = Field(1, ge=0, le=10)
    """Further attempts of a reward call that failed transiently (timed out, a refused or lost
    connection, HTTP 429 or 5xx) before it counts as failed; other errors are not retried. Each
    attempt gets its own `timeout_s`, so a call that hangs every time holds its batch up to
    (retries + 1) * timeout_s. `remote_judge` retries on its own (its `kwargs.retries`) and is not
    retried again. 0: no retries."""
    failure_reward: float = 0.0
    """Score a failed reward call (raised, timed out, NaN, wrong type) contributes."""
    correct_threshold: float = 1.0
    """Without `envs`, a sample counts as correct (`rollout/accuracy`, `eval/accuracy`) when its
    reward is at least this: full credit for 0/1 verifiers. An env decides with its own `is_correct`."""


# ----------------------------------------------------------------------------------------------- envs


class EnvSpec(Strict):
    name: str | None = None
    """A built-in environment by name: `arithmetic`, `math`, `calculator` (multi-turn, a calculator
    tool), `code` (unit tests in a sandbox)."""
    path: str | None = None
    """A user environment class by import path (`my_pkg.envs:MyEnv`) or file path (`./my_env.py:MyEnv`),
    a subclass of `tidal.envs.Env` or `tidal.envs.MultiTurnEnv`."""
    agent: str | None = None
    """An agent by import or file path (`./my_agent.py:run`): the user's own agent loop, written
    against the OpenAI API, trained through the rollout worker's OpenAI-compatible endpoint
    (`rollout.endpoint`). An `async def run(client, row, **kwargs)` gets an `openai.AsyncOpenAI`
    client for the episode (a plain `def` gets an `openai.OpenAI` one; a class is built with `kwargs`
    and its `run` method called) and returns the episode's reward (a float or a `RewardResult`).
    Every model call the agent makes is recorded token for token (`tidal.rollout.sessions`); an agent
    that raises, is idle past `rewards.timeout_s` between model calls, or never calls the model is
    recorded on its samples and counted."""
    verifiers: str | None = None
    """A `verifiers` environment (prime-rl's environment library, version 0.3): an installed
    environment package by id (`gsm8k`, as `vf-install` installs them) or a file (`./my_env.py`),
    whose `load_environment(**kwargs)` builds it. It runs as an agent through the endpoint, in a
    process of its own per rollout worker; its rubric's reward is the episode's reward and its
    dataset the env's prompts (held-out: its eval dataset, if it has one). `scripts/setup.sh
    --verifiers` installs verifiers where tidal looks for it."""
    label: str | None = None
    """The env's name in metrics (`env/<label>/...`); default: `name`, the class or function name,
    or the verifiers environment's."""
    weight: float = Field(1.0, gt=0.0)
    """Sampling weight: on average a share weight / (sum of weights) of each step's prompts comes
    from this env's data."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments the env class is built with."""
    data: DataConfig | None = None
    """This env's prompts (default: the run's `data` section)."""
    rewards: list[RewardSpec] = []
    """Extra reward functions added to the env's own score (e.g. a format reward), same form as
    `rewards.functions`."""
    isolation: Literal["thread", "process"] = "thread"
    """Where the env's sync `reset`, `step` and `score` run. `thread`: in the rollout worker, a call
    past `rewards.timeout_s` is abandoned (a thread cannot be killed, so one that spins keeps a core).
    `process`: in the reward process pool, each process building its own copy of the env, a call
    past the timeout killed with its process, which is replaced; the env must be a class a fresh
    process can import, and episode states, samples and results must pickle (a state `step` changes
    in place is copied back: a dict, list, set or an object's attributes)."""

    @model_validator(mode="after")
    def _one_source(self) -> EnvSpec:
        if sum(x is not None for x in (self.name, self.path, self.agent, self.verifiers)) != 1:
            raise ValueError(
                "an env needs exactly one of `name` (a built-in), `path` (module:Class), `agent` (module:function) "
                "or `verifiers` (an environment id or file)"
            )
        if self.verifiers is not None and self.data is not None:
            raise ValueError("a verifiers environment brings its own dataset; drop this env's `data`")
        if (self.agent or self.verifiers) is not None and self.isolation == "process":
            raise ValueError(
                "an agent runs on the rollout worker's event loop (isolation: thread); to run it in another "
                "process or a sandbox, start that from `run` and hand it `client.base_url` and `client.api_key`"
            )
        return self
