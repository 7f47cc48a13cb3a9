"""The typed config tree of a run: one pydantic model per component, YAML loading, dotted overrides.

Every field has a docstring (used to generate the README's field reference), unknown keys are
rejected with their full dotted path, and every user mistake surfaces as a `ConfigError` whose
message is one line that says what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user mistake in a config file or override; the CLI prints it as one line and exits 2."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def _with_default_tag(data: Any, key: str, default: str) -> Any:
    """A tagged-union section written without its `type` means the default variant."""
    if isinstance(data, dict) and isinstance(data.get(key), dict) and "type" not in data[key]:
        return {**data, key: {"type": default, **data[key]}}
    return data


# ---------------------------------------------------------------------------------------------- model


DEFAULT_PRESET = "tiny-qwen3-moe"


class ModelConfig(Strict):
    path: str | None = None
    """A Hugging Face causal-LM directory (save_pretrained format, with its tokenizer). Exclusive with `preset`."""
    preset: Literal["tiny-glm4-moe", "tiny-glm5-moe", "tiny-qwen3-moe"] | None = None
    """A tiny MoE built from config for CPU work (`tiny-qwen3-moe` when `path` is unset):
    GLM-4.5 (`glm4_moe`), GLM-5 (`glm_moe_dsa`, with
    DeepSeek sparse attention) or Qwen3-MoE, with a character-level tokenizer built in-process."""
    init_seed: int = 0
    """Seed of the random initialisation of a preset (presets are cached per name and seed)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the rollout engine runs the model in. The trainer's precision is `trainer.precision`."""
    sft_warm_start: str | None = None
    """An SFT run config (YAML path): the policy starts from that SFT run's checkpoint. The SFT run
    (with its own `model` section) is trained on first use and cached by its config's hash, so later
    runs reuse it. Exclusive with `path` and `preset`."""

    @model_validator(mode="before")
    @classmethod
    def _default_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and all(data.get(k) is None for k in ("path", "preset", "sft_warm_start")):
            data = {**data, "preset": DEFAULT_PRESET}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if sum(x is not None for x in (self.path, self.preset, self.sft_warm_start)) > 1:
            raise ValueError("set only one of model.path, model.preset or model.sft_warm_start")
        if self.sft_warm_start is not None and not Path(self.sft_warm_start).is_file():
            raise ValueError(f"model.sft_warm_start {self.sft_warm_start!r} is not a file; name an SFT run config")
        if self.path is not None and not Path(self.path).is_dir():
            raise ValueError(f"model.path {self.path!r} is not a directory; point it at a save_pretrained folder")
        return self


# ----------------------------------------------------------------------------------------------- data


class ArithmeticData(Strict):
    type: Literal["arithmetic"] = "arithmetic"
    """Built-in synthetic arithmetic: prompts like `12+7=`, answers checked exactly."""
    digits: int = Field(2, ge=1, le=6)
    """Difficulty knob: the largest number of digits of an operand."""
    num_operands: int = Field(2, ge=2, le=4)
    """Difficulty knob: operands per problem."""
    ops: list[Literal["+", "-", "*"]] = ["+", "-"]
    """Operators to draw from."""
    train_size: int = Field(20000, ge=1)
    """Problems in the train split."""
    eval_size: int = Field(200, ge=1)
    """Problems in the held-out split (disjoint from train)."""
    seed: int = 1234
    """Seed of the generator; the same seed gives the same splits."""


class FileData(Strict):
    type: Literal["files"] = "files"
    """Prompts from local json / jsonl / parquet files, read through HF `datasets`."""
    train_files: list[str]
    """Files of the train split."""
    eval_files: list[str] = []
    """Files of the held-out split (empty: no held-out evaluation)."""
    prompt_field: str = "prompt"
    """Column holding the prompt text."""
    answer_field: str = "answer"
    """Column holding the reference answer."""
    metadata_fields: list[str] = []
    """Extra columns carried with each row (e.g. for reward functions)."""

    @model_validator(mode="after")
    def _files_exist(self) -> FileData:
        for f in [*self.train_files, *self.eval_files]:
            if not Path(f).is_file():
                raise ValueError(f"data file {f!r} does not exist")
            if Path(f).suffix not in (".json", ".jsonl", ".parquet"):
                raise ValueError(f"data file {f!r}: expected a .json, .jsonl or .parquet file")
        return self


class DataConfig(Strict):
    source: Annotated[ArithmeticData | FileData, Field(discriminator="type")] = ArithmeticData()
    """Where prompts come from; `type` picks the variant (`arithmetic` or `files`)."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (user turn + generation prompt)."""
    max_prompt_tokens: int = Field(256, ge=1)
    """Prompts longer than this many tokens are an error rather than silently cut."""

    @model_validator(mode="before")
    @classmethod
    def _default_tag(cls, data: Any) -> Any:
        return _with_default_tag(data, "source", "arithmetic")


# -------------------------------------------------------------------------------------------- rollout


class RolloutConfig(Strict):
    engine: Literal["transformers"] = "transformers"
    """Generation engine. `transformers` runs on CPU or GPU."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature; 0 is greedy. Behavior log-probs are of logits / temperature."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    top_k: int = Field(0, ge=0)
    """Keep the k most likely tokens (0: no limit)."""
    max_new_tokens: int = Field(16, ge=1)
    """Largest number of generated tokens per completion."""
    stop: list[str] = []
    """Stop strings: generation of a completion ends after the token that completes one."""
    batch_size: int = Field(64, ge=1)
    """Sequences generated together in one forward batch."""
    group_size: int = Field(8, ge=1)
    """Completions sampled per prompt (a group; advantages are computed within it)."""
    prompts_per_step: int = Field(32, ge=1)
    """Prompts (groups) per training step, before filtering."""
    num_workers: int = Field(1, ge=1)
    """RolloutWorker actors; a step's prompts are split among them."""
    num_cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs each worker declares to Ray (its torch thread count is this, rounded up)."""
    num_gpus_per_worker: float = Field(0.0, ge=0.0)
    """GPUs each worker declares to Ray (0 on CPU machines)."""
    max_staleness: int = Field(0, ge=0)
    """A sample of policy version v is trained at trainer version <= v + max_staleness, never later
    (0: on-policy, rollout and training take turns). Workers are given prompts only as far ahead as
    this allows (backpressure); a sample that is still too old when trained is dropped and counted
    in `async/dropped_stale_samples`."""
    interruptible: bool = False
    """Apply a newly published snapshot inside a generation, at a chunk boundary, instead of only
    between generations. Each token records the version that sampled it (`Sample.versions`)."""
    chunk_tokens: int = Field(8, ge=1)
    """With `interruptible`: decode steps between two checks for a new snapshot."""
    max_context_tokens: int = Field(1024, ge=2)
    """Multi-turn envs: an episode ends when prompt + turns + observations reach this many tokens."""


# -------------------------------------------------------------------------------------------- trainer


class ScheduleConfig(Strict):
    type: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up from 0 over this many optimizer steps."""
    total_steps: int | None = Field(None, ge=1)
    """Steps the decay spans (default: the run's number of steps)."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Floor of the decay as a fraction of `lr`."""


class TrainerConfig(Strict):
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage (0-3)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision. bf16 keeps fp32 master weights in the optimizer."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per forward/backward on one rank."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step; the global batch is
    micro_batch_size x grad_accum x world size."""
    schedule: ScheduleConfig = ScheduleConfig()
    """Learning-rate schedule."""
    backend: Literal["gloo", "nccl"] | None = None
    """torch.distributed backend (default: nccl with CUDA, gloo otherwise)."""
    num_cpus: float = Field(1.0, gt=0.0)
    """CPUs the trainer actor declares to Ray (its torch thread count is this, rounded up)."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs the trainer actor declares to Ray (0 on CPU machines)."""


# -------------------------------------------------------------------------------------- weight sync


class ObjectStoreSync(Strict):
    type: Literal["object_store"] = "object_store"
    """Snapshots go through the Ray object store (works across nodes; the default)."""


class BroadcastSync(Strict):
    type: Literal["broadcast"] = "broadcast"
    """torch.distributed broadcast in buckets from the trainer to every worker (gloo on CPU, NCCL on
    GPU) in a process group of their own; metadata goes through Ray."""
    bucket_mb: float = Field(256.0, gt=0.0)
    """Largest bucket in MB; a tensor larger than this travels in a bucket of its own."""
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

    @model_validator(mode="before")
    @classmethod
    def _default_tag(cls, data: Any) -> Any:
        return _with_default_tag(data, "transport", "object_store")


# ------------------------------------------------------------------------------------------ algorithm


class NoCorrection(Strict):
    type: Literal["none"] = "none"
    """PPO clip on r = pi/pi_old alone, ignoring the behavior policy (the baseline)."""


class BehaviorCorrection(Strict):
    type: Literal["behavior"] = "behavior"
    """PPO clip on pi/mu with the behavior log-probs as the proximal policy (no recompute)."""


class TISCorrection(Strict):
    type: Literal["tis"] = "tis"
    """Truncated importance sampling: weight min(k, c) on the clip loss, k = pi_old/mu (Yao et al.
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


Correction = Annotated[
    NoCorrection | BehaviorCorrection | TISCorrection | MaskCorrection, Field(discriminator="type")
]


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
    eps_low: float = Field(0.2, ge=0.0)
    """PPO clip: r is clipped below at 1 - eps_low."""
    eps_high: float = Field(0.28, ge=0.0)
    """PPO clip: r is clipped above at 1 + eps_high (DAPO's clip-higher)."""
    dual_clip: float | None = Field(None, gt=1.0)
    """Dual clip c > 1: for negative advantages the loss is bounded by -c * A (null: off)."""
    aggregation: Literal["token-mean", "sequence-mean", "constant"] = "token-mean"
    """Token mean over the batch, mean of per-sequence means, or Dr. GRPO's sum / (sequences x
    rollout.max_new_tokens)."""
    kl: KLConfig = KLConfig()
    """KL penalty to the reference policy."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (subtracted from the loss)."""
    router_aux_coef: float = Field(0.0, ge=0.0)
    """Weight of the MoE load-balancing (router aux) loss; needs a model that returns router logits."""

    @model_validator(mode="before")
    @classmethod
    def _default_tag(cls, data: Any) -> Any:
        return _with_default_tag(data, "correction", "tis")


class AlgorithmConfig(Strict):
    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce_pp"] = "grpo"
    """Advantage estimator: GRPO (group mean / std), Dr. GRPO (group mean only), RLOO (leave-one-out
    mean), REINFORCE++ with group baseline and batch normalisation."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per rollout batch (the batch is split into this many mini-batches; pi_old is
    recomputed once before the first)."""
    loss: LossConfig = LossConfig()
    """Policy loss, off-policy correction and regularisers."""


class FilterConfig(Strict):
    zero_variance: bool = True
    """Dynamic sampling: drop groups whose rewards are all equal (no learning signal), counted."""
    drop_truncated: bool = False
    """Drop completions cut by rollout.max_new_tokens before advantages are computed, counted."""
    drop_failed_rewards: bool = False
    """Drop completions whose reward failed (raised, timed out, NaN) instead of scoring them with
    rewards.failure_reward, counted."""


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
    """Time limit of one reward call; a call over it is recorded as failed."""
    failure_reward: float = 0.0
    """Score a failed reward call (raised, timed out, NaN, wrong type) contributes."""


# ----------------------------------------------------------------------------------------------- envs


class EnvSpec(Strict):
    name: str | None = None
    """A built-in environment by name: `arithmetic`, `math`, `calculator` (multi-turn, a calculator
    tool), `code` (unit tests in a sandbox)."""
    path: str | None = None
    """A user environment class by import path (`my_pkg.envs:MyEnv`) or file path (`./my_env.py:MyEnv`),
    a subclass of `tidal.envs.Env` or `tidal.envs.MultiTurnEnv`."""
    label: str | None = None
    """The env's name in metrics (`env/<label>/...`); default: `name`, or the class name."""
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

    @model_validator(mode="after")
    def _one_source(self) -> EnvSpec:
        if (self.name is None) == (self.path is None):
            raise ValueError("an env needs exactly one of `name` (a built-in) or `path` (module:Class)")
        return self


# ------------------------------------------------------------------------------------------ train, ray


class TrainConfig(Strict):
    steps: int = Field(100, ge=1)
    """Rollout batches (training steps) of the run."""
    eval_every: int = Field(10, ge=0)
    """Evaluate on the held-out split every this many steps (0: only before and after)."""
    save_checkpoint: bool = True
    """Save the final policy as a HF checkpoint under the run directory."""


class RayConfig(Strict):
    address: str | None = None
    """Address of a running Ray cluster to join (null: start a local runtime)."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a local runtime (default: enough for the actors)."""
    timeout_s: float = Field(1800.0, gt=0.0)
    """Longest wait on any actor call (a rollout, a train step, a weight sync); past it the run
    stops with an error naming the call instead of hanging."""


# ------------------------------------------------------------------------------------------ sft, eval


class SFTConfig(Strict):
    steps: int = Field(300, ge=1)
    """Optimizer steps of supervised fine-tuning (at most, with `stop_at_accuracy`)."""
    log_every: int = Field(10, ge=1)
    """Log training metrics every this many steps."""
    stop_at_accuracy: float | None = Field(None, gt=0.0, le=1.0)
    """Stop once held-out accuracy reaches this (checked every `eval_every` steps): a warm start of
    a known quality, however fast the model learns on this machine (null: run all `steps`)."""
    eval_every: int = Field(20, ge=1)
    """With `stop_at_accuracy`: steps between held-out checks."""


class EvalConfig(Strict):
    num_samples: int | None = Field(None, ge=1)
    """Held-out problems to evaluate, per env with `envs` (default: the whole held-out split)."""
    max_new_tokens: int = Field(16, ge=1)
    """Largest number of tokens of a greedy answer."""


class MonitorConfig(Strict):
    wandb: Literal["online", "offline", "disabled"] = "offline"
    """wandb mode; `online` needs WANDB_API_KEY, `offline` writes under the run directory."""
    project: str = "tidal"
    """wandb project."""


# ------------------------------------------------------------------------------------------------ run


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
            raise ValueError("rewards.functions scores the run's `data`, which `envs` replaces; give each env "
                             "its extra rewards in envs[i].rewards instead")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _sync_fits_staleness(self) -> RunConfig:
        # Between two publishes the trainer takes (every - 1) x minibatches optimizer steps that the
        # workers do not see; samples they generate meanwhile would be dropped as too stale.
        lag = (self.weight_sync.every - 1) * self.algorithm.minibatches
        if lag > self.rollout.max_staleness:
            raise ValueError(
                f"weight_sync.every={self.weight_sync.every} with algorithm.minibatches="
                f"{self.algorithm.minibatches} lets workers fall {lag} versions behind, more than "
                f"rollout.max_staleness={self.rollout.max_staleness}; raise max_staleness or lower every"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------- loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings into (path, value); values are parsed as YAML (`1e-3`, `true`, `[1, 2]`)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string; users mean a number
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
            except ValueError:
                pass
        parsed.append((key, value))
    return parsed


def _dotted_loc(loc: tuple[int | str, ...], tree: Any) -> str:
    """The user's key path of an error location, without the union tags pydantic inserts."""
    parts, node = [], tree
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue  # a discriminated union's tag, not a key the user wrote
        parts.append(f"[{part}]" if isinstance(part, int) else str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts).replace(".[", "[")


def _format_error(err: ValidationError, tree: dict[str, Any]) -> str:
    unknown, parts = [], []
    for e in err.errors():
        loc = _dotted_loc(e["loc"], tree)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            unknown.append(f"'{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing config key '{loc}'")
        elif e["type"] == "union_tag_invalid":
            parts.append(f"config key '{loc}.type': {msg}")
        elif isinstance(e.get("input"), dict) or not loc:
            parts.append(msg)
        else:
            parts.append(f"config key '{loc}': {msg} (got {e.get('input')!r})")
    if unknown:
        parts.insert(
            0,
            f"unknown config key {', '.join(unknown)} (check the spelling; `tidal check` prints the known keys)",
        )
    return "; ".join(parts)


_TAGGED_SECTIONS = {
    ("data", "source"): "arithmetic",
    ("algorithm", "loss", "correction"): "tis",
    ("weight_sync", "transport"): "object_store",
}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or defaults when `path` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of config sections, got {type(loaded).__name__}")
        tree = loaded or {}
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        _set_dotted(tree, key, value)
    # A preset override replaces a path from the file (and vice versa), as a user expects.
    model = tree.get("model")
    if isinstance(model, dict) and parsed:
        keys = {k for k, _ in parsed}
        if "model.preset" in keys and "model.path" not in keys:
            model.pop("path", None)
        if "model.path" in keys and "model.preset" not in keys:
            model.pop("preset", None)
    for path, tag in _TAGGED_SECTIONS.items():
        parent = tree
        for k in path[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if isinstance(parent, dict):  # the tag is made explicit so error paths can strip it
            parent.update(_with_default_tag(parent, path[-1], tag))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, tree)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
