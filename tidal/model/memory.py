"""The memory a run will need, planned from its config and the policy's model config (`tidal plan`).

Per trainer rank, on its device: the weights, gradients and optimizer states of its ZeRO partition
(DeepSpeed's rules, `zero_stage` and offload) and torch AdamW's step temporaries, the activations
autograd keeps for the backward of one micro-batch (set by the token budget, or rows x the longest
row without one; a decoder layer's inputs only with activation checkpointing), a layer's backward
(the gradients of what it saved; recomputed first with checkpointing), the chunk of logits the
log-probs take at once, and the frozen models (the KL reference, a distillation teacher). A rank's
peak is the larger of its backward and its optimizer step, which never coincide. Per rollout engine:
its weights and KV cache. Per node, in host memory: what is offloaded there, each worker's staged
snapshot and the publish's buckets.

With LoRA (`model.lora`) the base is frozen in the trainer's dtype: gradients, masters and moments
are the adapters' alone (`Adapters`, counted as peft builds them); the backward keeps the frozen
layers' activations (counted as full fine-tuning's, an upper bound: on tiny-qwen3-moe a frozen layer
keeps ~20% less per token), each adapted linear's r-wide intermediate, and the merged weight
W + scale * B @ A peft builds for each adapted expert weight in the forward.

Parameters are counted, not estimated: the model is built from its config on the meta device (no
memory, any architecture transformers knows). Activations come from a count of the tensors a
decoder layer saves for its backward per token (`layer_activation_elements`), checked against what
autograd saves on the tiny presets (tests/unit/test_memory_plan.py) and against measured peaks
(bench/memory.py).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch
from torch import nn

from tidal.config import EXPERT_PARAMETERS, LoRAConfig, RunConfig
from tidal.model.forward import CHUNK_BYTES
from tidal.model.lora import matches, targets

GB = 2**30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "fp32": 4, "bf16": 2}
"""Bytes per element of `model.dtype` and of `trainer.precision`."""

GPUS_PER_NODE = 8
"""What a node holds, for the ranks and engines the plan puts on one."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the plan needs of a decoder-only (MoE) model, read from its config."""

    params: int
    """Every parameter, a tied one once."""
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    q_width: int
    """Elements per token of the queries (heads x query head width)."""
    kv_width: int
    """Elements per token of the keys (and of the values: a width each)."""
    latent_width: int
    """Elements per token of multi-head latent attention's low-rank latents (0 without MLA)."""
    kv_dim: int
    """Elements per token per layer of the KV cache (keys and values; a latent for MLA)."""
    experts: int
    top_k: int
    moe_intermediate: int
    shared_intermediate: int
    dense_intermediate: int
    dense_layers: int
    """Layers with a dense MLP instead of experts (GLM's `first_k_dense_replace`)."""
    positions: int | None
    linears: tuple[tuple[str, int, int], ...] = dataclasses.field(default=(), repr=False)
    """(name, in, out) of every linear layer: what LoRA's `target_modules` can adapt."""
    expert_weights: tuple[tuple[str, int, int, int], ...] = dataclasses.field(default=(), repr=False)
    """(name, experts, out, in) of every fused 3-D expert weight (`EXPERT_PARAMETERS`): what LoRA's
    `experts` adapts."""

    @classmethod
    def of(cls, config: Any) -> Architecture:
        """The architecture of a transformers config; parameters counted on the meta device."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        get = lambda *names, default=0: next((getattr(text, n) for n in names if getattr(text, n, None)), default)  # noqa: E731
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        head_dim = get("head_dim", default=hidden // max(heads, 1))
        kv_heads = get("num_key_value_heads", default=heads)
        if getattr(text, "kv_lora_rank", None):  # MLA (GLM-5, DeepSeek): the cache is a latent and a rope key
            q_head = get("qk_nope_head_dim") + get("qk_rope_head_dim")
            q_width, kv_width = heads * q_head, heads * get("v_head_dim", default=q_head)
            latent = get("q_lora_rank") + text.kv_lora_rank + get("qk_rope_head_dim")
            kv_dim = text.kv_lora_rank + get("qk_rope_head_dim")
        else:
            q_width, kv_width, latent = heads * head_dim, kv_heads * head_dim, 0
            kv_dim = 2 * kv_heads * head_dim
        experts = get("num_experts", "n_routed_experts", "num_local_experts")
        shared = get("n_shared_experts") * get("moe_intermediate_size") + get("shared_expert_intermediate_size")
        return cls(
            params=params,
            layers=get("num_hidden_layers"),
            hidden=hidden,
            vocab=get("vocab_size"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            q_width=q_width,
            kv_width=kv_width,
            latent_width=latent,
            kv_dim=kv_dim,
            experts=experts,
            top_k=get("num_experts_per_tok") if experts else 0,
            moe_intermediate=get("moe_intermediate_size") if experts else 0,
            shared_intermediate=shared if experts else 0,
            dense_intermediate=get("intermediate_size"),
            dense_layers=get("first_k_dense_replace") if experts else get("num_hidden_layers"),
            positions=getattr(text, "max_position_embeddings", None),
            linears=tuple(
                (n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)
            ),
            expert_weights=tuple(
                (n, *w.shape)
                for n, w in model.named_parameters()
                if w.dim() == 3 and any(n.endswith("." + t) for t in EXPERT_PARAMETERS)
            ),
        )


@dataclasses.dataclass(frozen=True)
class Adapters:
    """What `model.lora` adds to a policy, as `tidal.model.lora.apply_lora` (peft) builds it: a linear
    (in, out) gets A (r, in) and B (out, r); a fused expert weight (experts, out, in) gets A
    (r * experts, in) and B (out, r * experts)."""

    targets: tuple[str, ...]
    """The targets the policy has: of `target_modules`, and with `experts` the expert weights."""
    params: int
    """Elements of every A and B: the only trainable parameters."""
    intermediate: int
    """Elements per token of the adapted linears' r-wide intermediates (A x), all layers together:
    each keeps its own for B's gradient."""
    expert_elements: int
    """Elements of every adapted expert weight, all layers: peft builds each merged in the forward."""
    layer_expert_elements: int
    """The same, of one MoE layer (the largest)."""

    @classmethod
    def of(cls, arch: Architecture, lora: LoRAConfig) -> Adapters:
        """The adapters `lora` puts on `arch`, chosen as `apply_lora` chooses them: the linears whose
        name is a target or ends with "." and one (peft's rule), and with `lora.experts` every fused
        expert weight."""
        shapes = {f"{n}.weight": (o, i) for n, i, o in arch.linears}
        shapes |= {n: (e, o, i) for n, e, o, i in arch.expert_weights}
        modules, expert_targets = targets(lora, shapes)  # the choice apply_lora makes, and its errors
        linears = [(i, o) for n, i, o in arch.linears if any(matches(n, t) for t in modules)]
        experts = [w for w in arch.expert_weights if any(matches(w[0], t) for t in expert_targets)]
        per_layer = Counter[str]()
        for name, e, o, i in experts:
            per_layer[name.rsplit(".", 1)[0]] += e * o * i  # the experts module holds its layer's weights
        return cls(
            targets=(*modules, *expert_targets),
            params=lora.r * (sum(i + o for i, o in linears) + sum(e * (o + i) for _, e, o, i in experts)),
            intermediate=lora.r * len(linears),
            expert_elements=sum(per_layer.values()),
            layer_expert_elements=max(per_layer.values(), default=0),
        )


def layer_activation_elements(arch: Architecture, moe: bool = True) -> int:
    """Elements one decoder layer saves for its backward per token (in the training dtype), counted
    from the tensors its ops keep (measured op by op on the tiny presets: within 2%):
    - attention, 5 h + 4 q + 5 kv + heads (q, kv: the query and key widths): two RMSNorms (input and
      normalised input each), the projections' shared input, q and k norms (input and output), rotary
      and attention (a fused kernel: q, k, v, output, log-sum-exp; nothing quadratic in the length);
      with multi-head latent attention, its latents twice more (their projections and norms);
    - a routed MoE, top-k (h + 5 i) + h + 2 experts: per expert a token takes, its copy of the input,
      the fused gate-up output, the activation's input and output, the down projection's input; the
      router's input and probabilities; a shared expert or a dense MLP of width i, 4 i."""
    h, q, kv = arch.hidden, arch.q_width, arch.kv_width
    attention = 5 * h + 4 * q + 5 * kv + arch.heads + 2 * arch.latent_width
    if moe and arch.experts:
        mlp = arch.top_k * (h + 5 * arch.moe_intermediate) + h + 2 * arch.experts + 4 * arch.shared_intermediate
    else:
        mlp = 4 * arch.dense_intermediate
    return attention + mlp


@dataclasses.dataclass
class Plan:
    """Bytes per process, by part, and the peaks they make; `tidal plan` prints it and `tidal train`
    checks it at start."""

    arch: Architecture
    trainer: dict[str, int]
    """Per trainer rank on its device (the host when it has no GPU)."""
    engine: dict[str, int]
    """Per rollout engine, on its device(s) (per GPU with tensor parallelism)."""
    host: dict[str, int]
    """Per node in host memory, beyond each process's own (Python, CUDA context)."""
    micro_tokens: int
    """Token slots (rows x width) of the largest micro-batch the plan assumes."""
    adapters: Adapters | None = None
    """LoRA's adapters, the only parameters trained (None: full fine-tuning)."""
    # What exists at once in each phase of a step; a rank's peak is the larger. In the backward the
    # log-prob chunk is recomputed first, then the layers one by one: the larger of the two counts.
    BACKWARD = (
        *("weights", "LoRA adapters", "gradients", "optimizer states", "activations", "LoRA merged expert weights"),
        *("packed attention mask", "KL reference", "distillation teacher"),
    )
    STEP = (
        *("weights", "LoRA adapters", "gradients", "optimizer states", "optimizer step temporaries"),
        *("KL reference", "distillation teacher"),
    )

    def phase(self, parts: tuple[str, ...]) -> int:
        return sum(self.trainer.get(k, 0) for k in parts)

    @property
    def trainer_backward(self) -> int:
        """A rank's memory in a micro-batch's backward: the weights, the gradients of earlier
        micro-batches, the optimizer states, every activation kept, and the larger of the logits
        chunk and a layer's backward."""
        working = max(self.trainer.get("backward working set", 0), self.trainer.get("log-prob chunk", 0))
        return self.phase(self.BACKWARD) + working

    @property
    def trainer_step(self) -> int:
        """A rank's memory in the optimizer step: weights, gradients, states and the step's temporaries."""
        return self.phase(self.STEP)

    @property
    def trainer_total(self) -> int:
        """A rank's peak: the larger of the backward and the optimizer step."""
        return max(self.trainer_backward, self.trainer_step)

    @property
    def engine_total(self) -> int:
        return sum(self.engine.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def plan_memory(
    cfg: RunConfig,
    arch: Architecture,
    prompt_tokens: int | None = None,
    multi_turn: bool = False,
    teacher: Architecture | None = None,
) -> Plan:
    """The plan of `cfg` for a policy of architecture `arch` (`Architecture.of`), whose prompts are
    at most `prompt_tokens` long (`data.max_prompt_tokens` when not given), its episodes multi-turn
    or not, and with `algorithm.distill` a teacher of architecture `teacher`."""
    t, r = cfg.trainer, cfg.rollout
    prompt = prompt_tokens if prompt_tokens is not None else cfg.data.max_prompt_tokens
    # A row is its prompt and completion; a multi-turn episode grows up to rollout.max_context_tokens.
    width = r.max_context_tokens if multi_turn else prompt + r.max_new_tokens
    tokens = t.max_tokens_per_micro_batch or t.micro_batch_size * width
    host: dict[str, int] = {}
    adapters = Adapters.of(arch, cfg.model.lora) if cfg.model.lora is not None else None
    trainer = _trainer_parts(cfg, arch, tokens, host, adapters)
    if teacher is not None:
        trainer["distillation teacher"] = weight_share(cfg, teacher.params)
    engine, workers_per_node = _engine_parts(cfg, arch, width, host)
    plan = Plan(arch, trainer, engine, host, tokens, adapters)
    if not _on_gpu(cfg):  # on CPU the trainer and the engines live in host memory too
        host["trainer ranks"] = plan.trainer_total * _ranks_per_node(cfg)
        host["rollout engines"] = plan.engine_total * workers_per_node
    return plan


def weight_share(cfg: RunConfig, params: int) -> int:
    """A rank's bytes of `params` weights held as the policy's are: in the training dtype, split over
    the ranks at ZeRO-3 (the policy, LoRA's adapters, the KL reference, a distillation teacher)."""
    t = cfg.trainer
    return params * DTYPE_BYTES[t.precision] // (t.num_ranks if t.zero_stage == 3 else 1)


def training_states(cfg: RunConfig, trainable: int) -> dict[str, int]:
    """A rank's gradients, optimizer states and optimizer step temporaries for `trainable` parameters
    (all of them, or LoRA's adapters), offload aside."""
    t, n, stage = cfg.trainer, cfg.trainer.num_ranks, cfg.trainer.zero_stage
    # Bytes per parameter of each state, and over how many ranks it is split (DeepSpeed's rules):
    # gradients (split from stage 2), and the optimizer's states: AdamW's two fp32 moments, and in
    # bf16 an fp32 master copy (split from stage 1).
    grad_bytes = 4 if t.precision == "bf16" and stage in (1, 2) else DTYPE_BYTES[t.precision]
    optimizer_bytes = 8 + (4 if t.precision == "bf16" else 0)
    return {
        "gradients": trainable * grad_bytes // (n if stage >= 2 else 1),
        "optimizer states": trainable * optimizer_bytes // (n if stage >= 1 else 1),
        # torch's AdamW (foreach) steps with an fp32 temporary the size of its parameters.
        "optimizer step temporaries": trainable * 4 // (n if stage >= 1 else 1),
    }


def _trainer_parts(
    cfg: RunConfig, arch: Architecture, tokens: int, host: dict[str, int], adapters: Adapters | None
) -> dict[str, int]:
    """A trainer rank's parts for micro-batches of `tokens` token slots, training every parameter or
    LoRA's `adapters` alone; what it offloads goes to `host`."""
    t, n, p, stage = cfg.trainer, cfg.trainer.num_ranks, arch.params, cfg.trainer.zero_stage
    weight_bytes = DTYPE_BYTES[t.precision]
    trainable = adapters.params if adapters is not None else p
    # The model's weights (LoRA's frozen base too, in the same dtype) are split at stage 3.
    weights = {"weights": weight_share(cfg, p)}
    if adapters is not None:
        weights["LoRA adapters"] = weight_share(cfg, adapters.params)
    states = training_states(cfg, trainable)
    ranks_per_node = _ranks_per_node(cfg)
    if t.offload_optimizer:
        host["trainer optimizer states (offloaded)"] = states["optimizer states"] * ranks_per_node
        host["trainer fp32 gradients (offloaded)"] = trainable * 4 // n * ranks_per_node
        host["trainer optimizer step temporaries"] = states["optimizer step temporaries"] * ranks_per_node
        states["optimizer states"] = states["optimizer step temporaries"] = 0
        if stage >= 2:
            states["gradients"] = trainable * weight_bytes // n
    if t.offload_params:
        host["trainer weights (offloaded)"] = sum(weights.values()) * ranks_per_node
        weights = dict.fromkeys(weights, 0)

    trainer = {**weights, **states, **_activation_parts(cfg, arch, tokens, adapters)}
    # The logits of one chunk, fp32, with their softmax, the entropy's product and the gradient.
    trainer["log-prob chunk"] = 4 * min(CHUNK_BYTES, tokens * arch.vocab * 4)
    if t.packing and cfg.model.attn_implementation != "flash_attention_2":
        # sdpa and eager keep a packed micro-batch's rows apart with a (tokens x tokens) boolean mask.
        trainer["packed attention mask"] = tokens * tokens
    if cfg.algorithm.loss.kl.coef > 0 and adapters is None:  # under LoRA the reference is the frozen base
        trainer["KL reference"] = weight_share(cfg, p)
    return trainer


def _activation_parts(cfg: RunConfig, arch: Architecture, tokens: int, adapters: Adapters | None) -> dict[str, int]:
    """What a micro-batch of `tokens` token slots keeps for its backward, and a layer's backward beside it."""
    t, weight_bytes = cfg.trainer, DTYPE_BYTES[cfg.trainer.precision]
    moe_layers = arch.layers - arch.dense_layers
    lora_width = adapters.intermediate if adapters is not None else 0
    layer = tokens * (layer_activation_elements(arch, moe=moe_layers > 0) + lora_width // arch.layers) * weight_bytes
    if t.activation_checkpointing:
        # Each layer's input is kept; in the backward a layer is recomputed (its activations) and
        # runs its own backward (their gradients) at once.
        activations = tokens * arch.layers * arch.hidden * weight_bytes
        working = 2 * layer
    else:
        # Every layer's saved tensors; while a layer runs its backward, their gradients beside them.
        per_token = moe_layers * layer_activation_elements(arch) + arch.dense_layers * layer_activation_elements(
            arch, moe=False
        )
        activations = tokens * (per_token + lora_width) * weight_bytes
        working = layer
    parts = {"activations": activations, "backward working set": working}
    if adapters is not None and adapters.expert_elements:
        # peft runs the experts on W + scale * B @ A, built whole in the forward (one tensor the size
        # of the layer's expert weights) and kept for the backward: every MoE layer's, or with
        # checkpointing the one layer being recomputed. The layer's backward makes its gradient
        # (a tensor as large) before B's and A's.
        merged = adapters.layer_expert_elements if t.activation_checkpointing else adapters.expert_elements
        parts["LoRA merged expert weights"] = merged * weight_bytes
        parts["backward working set"] += adapters.layer_expert_elements * weight_bytes
    return parts


def _engine_parts(cfg: RunConfig, arch: Architecture, context: int, host: dict[str, int]) -> tuple[dict[str, int], int]:
    """A rollout engine's parts (per GPU with tensor parallelism) at `context` tokens a sequence, and
    the workers on a node; what the workers and the publish hold in host memory goes to `host`."""
    r, p = cfg.rollout, arch.params
    rollout_bytes = DTYPE_BYTES[cfg.model.dtype]
    tp = r.vllm.tensor_parallel_size if r.engine == "vllm" else 1
    # The KV cache of every sequence an engine runs at once, at the longest context: vLLM's on a GPU
    # (what its share of the GPU, rollout.vllm.gpu_memory_utilization, must leave room for); on the
    # CPU the rollout.vllm.kv_cache_gb it reserves; the transformers engine's for a generate call.
    rows = r.vllm.max_num_seqs if r.engine == "vllm" else r.batch_size
    kv = rows * context * arch.layers * arch.kv_dim * rollout_bytes // tp
    if r.engine == "vllm" and not _on_gpu(cfg):
        kv = int(r.vllm.kv_cache_gb * GB)
    engine = {"weights": p * rollout_bytes // tp, "KV cache": kv}
    workers_per_node = r.num_workers if not _on_gpu(cfg) else max(1, min(r.num_workers, GPUS_PER_NODE // tp))
    # A worker stages one received snapshot beyond its engine's weights; the publish holds a bucket.
    host["staged snapshots"] = p * rollout_bytes * workers_per_node
    bucket = min(int(cfg.weight_sync.bucket_mb * 2**20), p * rollout_bytes)
    if tp > 1:  # vLLM's worker processes read each update as safetensors parts in /dev/shm, 2 at a time
        host["/dev/shm snapshot parts (TP > 1)"] = 2 * bucket * workers_per_node
    host["publish buckets"] = 2 * bucket
    return engine, workers_per_node


def _on_gpu(cfg: RunConfig) -> bool:
    return cfg.trainer.num_gpus > 0


def _ranks_per_node(cfg: RunConfig) -> int:
    if not _on_gpu(cfg):
        return cfg.trainer.num_ranks
    return min(cfg.trainer.num_ranks, max(1, int(GPUS_PER_NODE // max(cfg.trainer.num_gpus, 1))))


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 2**20:.0f} MB"
