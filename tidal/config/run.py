"""The whole run's config: every section, and the checks that span sections."""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from tidal.config.base import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    MonitorConfig,
    RayConfig,
    RolloutConfig,
    SFTConfig,
    Strict,
    TrainConfig,
    TrainerConfig,
)
from tidal.config.rl import AlgorithmConfig, BehaviorCorrection, EnvSpec, FilterConfig, RewardsConfig, WeightSyncConfig

# ------------------------------------------------------------------------------------------------ run

RL_LR = 1e-6
"""`trainer.lr` of `tidal train` when unset (peers start RL of pretrained LLMs at about 1e-6)."""
SFT_LR = 1e-5
"""`trainer.lr` of `tidal sft` when unset."""
GROUP_RELATIVE = ("grpo", "drgrpo", "rloo", "reinforce_pp")
"""Advantage estimators whose baseline is the prompt's group (REINFORCE++ here uses a group baseline too)."""


class RunConfig(Strict):
    name: str = "run"
    """Run name; outputs go to `<output_dir>/<name>/`."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seed of sampling, data order and dropout."""
    model: ModelConfig = ModelConfig()
    """The policy model."""
    data: DataConfig = DataConfig()
    """Prompt data."""
    rollout: RolloutConfig = RolloutConfig()
    """Generation."""
    trainer: TrainerConfig = TrainerConfig()
    """DeepSpeed trainer."""
    sft: SFTConfig = SFTConfig()
    """Supervised fine-tuning stage (`tidal sft`)."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation."""
    monitor: MonitorConfig = MonitorConfig()
    """Metrics sinks."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """RL algorithm: advantage estimator, mini-batches, policy loss (`tidal train`)."""
    rewards: RewardsConfig = RewardsConfig()
    """Reward functions of `tidal train` (of the run's `data` when `envs` is empty); `timeout_s`
    and `failure_reward` apply to every env call too."""
    envs: list[EnvSpec] = []
    """Environments to train on, mixed by weight, each with its own data (empty: the run's `data`
    scored by `rewards.functions`)."""
    filter: FilterConfig = FilterConfig()
    """Group and sample filters applied before advantages."""
    train: TrainConfig = TrainConfig()
    """The RL loop of `tidal train`."""
    ray: RayConfig = RayConfig()
    """Ray runtime."""
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    """How and how often the trainer publishes weights to the rollout workers."""

    @model_validator(mode="after")
    def _rewards_or_envs(self) -> RunConfig:
        # Compared with the default rather than "was it set", so a dumped config (every field
        # written out) loads back.
        if self.envs and self.rewards.functions != RewardsConfig().functions:
            raise ValueError(
                "rewards.functions scores the run's `data`, which `envs` replaces; give each env "
                "its extra rewards in envs[i].rewards instead"
            )
        return self

    @model_validator(mode="after")
    def _distill_filters(self) -> RunConfig:
        if self.algorithm.distill is None:
            return self
        # A group whose rewards are all equal still carries the teacher's per-token signal: the
        # zero-variance filter is off unless the config turns it on.
        if "zero_variance" not in self.filter.model_fields_set:
            self.filter.zero_variance = False
        if self.filter.zero_variance and not self.envs and not self.rewards.functions:
            raise ValueError(
                "filter.zero_variance drops groups of equal rewards, and with rewards.functions: [] every "
                "reward is 0, so every group would be dropped; set filter.zero_variance=false"
            )
        return self

    @model_validator(mode="after")
    def _sync_fits_staleness(self) -> RunConfig:
        # Between two publishes the trainer takes (every - 1) x minibatches optimizer steps that the
        # workers do not see; samples they generate meanwhile would be dropped as too stale. An
        # adaptive bound can fall to its floor (at most max_staleness), so the lag must fit that.
        lag = (self.weight_sync.every - 1) * self.algorithm.minibatches
        adaptive = self.rollout.adaptive_staleness
        key, bound = (
            ("adaptive_staleness.min_staleness", adaptive.min_staleness)
            if adaptive
            else ("max_staleness", self.rollout.max_staleness)
        )
        if lag > bound:
            raise ValueError(
                f"weight_sync.every={self.weight_sync.every} with algorithm.minibatches="
                f"{self.algorithm.minibatches} lets workers fall {lag} versions behind, more than "
                f"rollout.{key}={bound}; raise {key.rsplit('.', 1)[-1]} or lower every"
            )
        if adaptive and isinstance(self.algorithm.loss.correction, BehaviorCorrection):
            raise ValueError(
                "rollout.adaptive_staleness measures log(pi_old/mu) on the recomputed pi_old, which "
                "correction type behavior skips; use correction tis, mask or none"
            )
        return self

    @model_validator(mode="after")
    def _lora_adapters_on_vllm_need_gpus(self) -> RunConfig:
        lora = self.model.lora
        if lora is not None and lora.publish == "adapters" and self.rollout.engine == "vllm":
            if self.rollout.num_gpus_per_worker == 0:
                raise ValueError(
                    "model.lora.publish: adapters on rollout.engine: vllm needs GPU workers: vLLM's CPU backend "
                    "has no LoRA for MoE models (its fused-MoE LoRA kernels are Triton); set "
                    "model.lora.publish: merged, or rollout.engine: transformers"
                )
        return self

    @model_validator(mode="after")
    def _routing_records_need_transformers(self) -> RunConfig:
        if self.algorithm.routing_replay == "r3":
            self.rollout.record_routing = True  # replay needs the records
        if self.rollout.record_routing and self.rollout.engine == "vllm":
            raise ValueError(
                "rollout.record_routing needs rollout.engine=transformers for now: vLLM 0.32 returns "
                "routed experts only from its V2 model runner (it needs Triton, so not on CPU), which "
                "tidal does not drive yet"
            )
        if self.rollout.record_routing and self.trainer.packing:
            raise ValueError(
                "trainer.packing does not keep routing records yet (rollout.record_routing, "
                f"algorithm.routing_replay={self.algorithm.routing_replay}): turn one of them off"
            )
        return self

    @model_validator(mode="after")
    def _deterministic_leaves_nothing_to_timing(self) -> RunConfig:
        if self.rollout.deterministic and self.filter.max_oversample:
            raise ValueError(
                "filter.max_oversample needs streaming rollout (rollout.deterministic: false): which "
                "prompt replaces a filtered group depends on timing"
            )
        if self.rollout.deterministic and self.rollout.interruptible:
            raise ValueError(
                "rollout.interruptible needs streaming rollout (rollout.deterministic: false): where "
                "new weights land inside a generation depends on timing"
            )
        return self

    @property
    def oversample_per_batch(self) -> int:
        """Extra groups that may replace filtered ones in one batch (`filter.max_oversample`)."""
        return int(self.filter.max_oversample * self.rollout.prompts_per_step)

    def for_rl(self) -> RunConfig:
        """This config as `tidal train` runs it: RL defaults filled in, settings that cannot work in
        RL refused with a one-line ConfigError."""
        r = self.rollout
        if self.trainer.grad_accum != 1:
            raise ConfigError(
                f"trainer.grad_accum={self.trainer.grad_accum} applies to `tidal sft` only: an RL optimizer step takes "
                "one mini-batch (rollout.prompts_per_step x rollout.group_size / algorithm.minibatches samples) in "
                "micro-batches of trainer.micro_batch_size; set algorithm.minibatches to change the step size"
            )
        if not self.envs and not self.rewards.functions and self.algorithm.distill is None:
            raise ConfigError(
                "rewards.functions is empty: every reward is 0 and nothing is learned; name a reward "
                "function, or distil from a teacher (algorithm.distill)"
            )
        if r.group_size == 1 and self.algorithm.advantage in GROUP_RELATIVE and self.algorithm.distill is None:
            raise ConfigError(
                f"rollout.group_size=1 with algorithm.advantage={self.algorithm.advantage}: the baseline is the "
                "group's own reward, so every advantage is 0 and nothing is learned; use rollout.group_size >= 2"
            )
        if r.temperature == 0:
            raise ConfigError(
                "rollout.temperature=0 (greedy) cannot train: RL needs sampled completions and "
                "their behavior log-probs; use a temperature > 0 (greedy is for evaluation)"
            )
        for key, value, default in (("top_p", r.top_p, 1.0), ("top_k", r.top_k, 0)):
            if value != default:
                raise ConfigError(
                    f"rollout.{key}={value:g} truncates the sampling distribution, but the trainer's log-probs are of "
                    "the untruncated distribution (logits / temperature), so importance weights would depend on the "
                    f"engine (vLLM reports truncated log-probs, transformers untruncated ones); use rollout.{key}="
                    f"{default:g} and the temperature to sharpen sampling"
                )
        return self._with_lr(RL_LR)

    def for_sft(self) -> RunConfig:
        """This config as `tidal sft` runs it: SFT defaults filled in."""
        return self._with_lr(SFT_LR)

    def _with_lr(self, default: float) -> RunConfig:
        if self.trainer.lr is not None:
            return self
        return self.model_copy(update={"trainer": self.trainer.model_copy(update={"lr": default})})

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
