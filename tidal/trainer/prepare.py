"""What the trainer sets up before its engine: torch.distributed and DeepSpeed's view of it, the
DeepSpeed config and lr schedule of a trainer config, and the model as it trains (each rank's
partition at ZeRO-3, MoE blocks as ZeRO-3 leaves, activation checkpointing)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import set_z3_leaf_modules
from transformers import PreTrainedModel

from tidal.config import ScheduleConfig, TrainerConfig
from tidal.model.loading import load_model
from tidal.model.routing import checkpoint_contexts

# ------------------------------------------------------------------------------------ distributed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> None:
    """Initialise torch.distributed (and DeepSpeed's view of it) once per process.

    Under a launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) this joins
    that world; without one it is a world of one in this process, initialised over a free local
    port passed as `init_method` rather than through the environment, so that the variables do not
    leak into child processes (a Ray worker forked later would inherit a port already taken). The
    backend defaults to nccl with CUDA and gloo otherwise (DeepSpeed's CPU default, ccl, is absent).
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    # The engine reads its device index from LOCAL_RANK.
    os.environ.setdefault("LOCAL_RANK", "0")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if backend == "gloo":
        # CPU ranks: DeepSpeed would JIT-compile its shared-memory all-reduce op in every trainer
        # process (25-80 s on 2 cores; rebuilt each time when the pip and system ninja, whose log
        # hashes differ, share the build cache); gloo all-reduces without it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if dist.is_initialized() or "RANK" in os.environ:
        # A no-op when initialised already (DeepSpeed then wraps the existing process group).
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    else:
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
        )


# ---------------------------------------------------------------------------------------- helpers


def lr_factor(step: int, schedule: ScheduleConfig, total_steps: int | None) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Linear warm-up (step + 1) / (warmup + 1) over the first `warmup_steps` steps, then constant,
    or a cosine / linear decay that reaches `min_lr_ratio` at step `total_steps - 1`.
    """
    w = schedule.warmup_steps
    if step < w:
        return (step + 1) / (w + 1)
    if schedule.type == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"a {schedule.type} lr schedule needs trainer.schedule.total_steps (or the run's steps)")
    progress = min(1.0, (step - w) / max(1, total_steps - 1 - w))
    floor = schedule.min_lr_ratio
    if schedule.type == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def deepspeed_config(cfg: TrainerConfig) -> dict[str, Any]:
    """The DeepSpeed config dict of a trainer config.

    Gradient accumulation is caller-owned (`managed_gradient_accumulation: false`): every
    `engine.step()` is a boundary, so a batch may hold any number of micro-batches. Clipping at
    ZeRO 0 in fp32 is done by the trainer (DeepSpeed's own does not report the norm).
    """
    own_clip = cfg.zero_stage == 0 and cfg.precision == "fp32"
    pin = torch.cuda.is_available()  # page-locked host buffers speed the copies to and from a GPU
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0 if own_clip or cfg.max_grad_norm is None else cfg.max_grad_norm,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # Unmanaged accumulation supports overlap_comm at stage 2 only; on CPU it buys nothing.
            "overlap_comm": False,
            **({"offload_optimizer": {"device": "cpu", "pin_memory": pin}} if cfg.offload_optimizer else {}),
            **({"offload_param": {"device": "cpu", "pin_memory": pin}} if cfg.offload_params else {}),
        },
        # Offloaded states are stepped by the client torch AdamW (on the CPU, where they are), not by
        # DeepSpeed's CPUAdam, which would compile an op at start-up.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def moe_block_classes(model: torch.nn.Module) -> list[type[torch.nn.Module]]:
    """The classes of `model`'s MoE blocks: modules with an `experts` child and a router (`gate` or
    `router`), e.g. Qwen3MoeSparseMoeBlock, Glm4MoeMoE, GlmMoeDsaMoE, DeepSeek-style remote code."""
    found = {type(m) for m in model.modules() if hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router"))}
    return sorted(found, key=lambda c: c.__name__)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """`trainer.activation_checkpointing`: each decoder layer recomputed in the backward (transformers'
    gradient checkpointing, non-reentrant, which ZeRO-3 and torch.compile support), with the
    recompute marked so that routing recorders skip it."""
    if not model.supports_gradient_checkpointing:
        raise ValueError(
            f"trainer.activation_checkpointing: {type(model).__name__} does not support gradient checkpointing"
        )
    model.config.use_cache = False
    kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # A layer checkpoints only in training mode, and the trainer's model stays in eval mode (no
    # dropout, so that it computes the log-probs the rollout did): the layers' own flag alone is set,
    # their submodules stay in eval mode.
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    if not layers:
        raise ValueError(f"trainer.activation_checkpointing: {type(model).__name__} has no layer to checkpoint")
    for layer in layers:
        layer.training = True


def load_for_training(path: str | Path, cfg: TrainerConfig, attn_implementation: str | None = None) -> PreTrainedModel:
    """The model to train. At ZeRO-3 every rank loads only its partition of each parameter
    (transformers' loading under `deepspeed.zero.Init`), so no rank ever holds the whole model, on
    the GPU or the host: what lets a model larger than one device train. Collective at ZeRO-3."""
    if cfg.zero_stage != 3:
        return load_model(path, attn_implementation=attn_implementation)
    from transformers.integrations import HfDeepSpeedConfig

    init_distributed(cfg.backend)
    # transformers finds the config through a weak reference while the object lives: only this load
    # is partitioned, not a reference model loaded later.
    ds_config = HfDeepSpeedConfig(deepspeed_config(cfg))
    try:
        return load_model(path, attn_implementation=attn_implementation)
    finally:
        del ds_config


def load_reference(
    path: str | Path, cfg: TrainerConfig, device: torch.device, attn_implementation: str | None = None
) -> torch.nn.Module:
    """The frozen KL reference (`algorithm.loss.kl`), held as the policy is: in the training dtype
    (bf16 with `trainer.precision: bf16`), and at ZeRO-3 partitioned over the ranks like the policy
    (each rank loads and keeps its partition; a forward gathers one MoE block or layer at a time,
    through a DeepSpeed engine without an optimizer): never a whole fp32 copy on every rank.
    Collective at ZeRO-3."""
    if cfg.zero_stage != 3:
        model = load_model(path, attn_implementation=attn_implementation)
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        return model.to(device, dtype).eval().requires_grad_(False)
    model = load_for_training(path, cfg, attn_implementation=attn_implementation).eval().requires_grad_(False)
    if blocks := moe_block_classes(model):  # as for the policy: every rank gathers a block whole
        set_z3_leaf_modules(model, blocks)
    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(cfg))
    engine.eval()  # (DeepSpeed's returns nothing)
    return engine
