"""`tidal plan CONFIG`: the memory each process of a run will need, before anything starts; and the
check `tidal train` makes with it at start (a run that cannot fit the memory it can see is refused in
one line naming the levers).

The figures come from `tidal.model.memory.plan_memory`, from the config and the policy's model
config alone (its weights are never read).
"""

from __future__ import annotations

import os
from typing import Any

from tidal.config import ConfigError, ModelConfig, RunConfig, load_config
from tidal.model.loading import build_char_tokenizer, preset_config, warm_start_dir
from tidal.model.memory import Architecture, Plan, gb, plan_memory, training_states

LEVERS = (
    "trainer.zero_stage=3, trainer.activation_checkpointing=true, trainer.max_tokens_per_micro_batch, "
    "trainer.offload_optimizer=true, more trainer.num_ranks"
)


def policy_config(model: ModelConfig) -> Any:
    """The transformers config of the policy: a preset's, a model directory's, or an SFT warm
    start's base model's (a warm start keeps its architecture)."""
    if model.sft_warm_start is not None:
        cached = warm_start_dir(model.sft_warm_start) / "checkpoint"
        if (cached / "config.json").is_file():
            return _from_dir(str(cached))
        return policy_config(load_config(model.sft_warm_start).model)
    if model.preset is not None:
        return preset_config(model.preset, build_char_tokenizer())
    assert model.path is not None
    return _from_dir(model.path)


def _from_dir(path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path {path!r}: cannot read its config.json ({str(e).splitlines()[0]})") from None


def plan_run(cfg: RunConfig, prompt_tokens: int | None = None, multi_turn: bool = False) -> Plan:
    """The memory plan of `cfg` (as `tidal train` runs it), its rows `prompt_tokens` (the data's
    longest prompt; `data.max_prompt_tokens` without it) plus the completion long, or with
    `multi_turn` episodes `rollout.max_context_tokens`."""
    distill = cfg.algorithm.distill
    teacher = Architecture.of(policy_config(distill.teacher_model())) if distill is not None else None
    return plan_memory(cfg, Architecture.of(policy_config(cfg.model)), prompt_tokens, multi_turn, teacher)


def describe(plan: Plan, cfg: RunConfig) -> list[str]:
    """`tidal plan`'s lines: what the plan assumes, then each process's parts and total."""
    a, t, r = plan.arch, cfg.trainer, cfg.rollout
    experts = f", {a.experts} experts, top-{a.top_k}" if a.experts else ""
    where = "GPU" if t.num_gpus > 0 else "host (no GPU)"
    lines = [
        f"policy: {_count(a.params)} parameters ({a.layers} layers{experts}, vocabulary {a.vocab})",
        f"trainer: {t.num_ranks} rank(s), ZeRO-{t.zero_stage}, {t.precision}, micro-batches of {plan.micro_tokens:,} "
        f"token slots{', activation checkpointing' if t.activation_checkpointing else ''}",
        *_lora_lines(plan, cfg),
        f"trainer rank, on its {where}: {gb(plan.trainer_total)} at its peak (the backward "
        f"{gb(plan.trainer_backward)}, the optimizer step {gb(plan.trainer_step)})",
        *(f"  {name:<38} {gb(n)}" for name, n in plan.trainer.items()),
        f"rollout engine ({r.engine}, {r.num_workers} worker(s)), per {'GPU' if r.num_gpus_per_worker else 'engine'}: "
        f"{gb(plan.engine_total)}",
        *(f"  {name:<38} {gb(n)}" for name, n in plan.engine.items()),
        f"host memory per node, beyond each process's own: {gb(plan.host_total)}",
        *(f"  {name:<38} {gb(n)}" for name, n in plan.host.items()),
    ]
    return lines


def _lora_lines(plan: Plan, cfg: RunConfig) -> list[str]:
    """What LoRA trains, and what its gradients and optimizer states take per rank (on the device or
    offloaded) against training every parameter."""
    lora, adapters = cfg.model.lora, plan.adapters
    if lora is None or adapters is None:
        return []
    states = lambda n: sum(v for k, v in training_states(cfg, n).items() if k != "optimizer step temporaries")  # noqa: E731
    return [
        f"LoRA: r {lora.r} on {', '.join(adapters.targets)}, the base frozen: {_count(adapters.params)} adapter "
        f"parameters ({adapters.params / plan.arch.params:.2%} of the policy)",
        f"  {'their gradients and optimizer states':<38} {gb(states(adapters.params))} per rank "
        f"(training every parameter: {gb(states(plan.arch.params))})",
    ]


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def summary(plan: Plan) -> str:
    """The one line `tidal train` logs at start."""
    return (
        f"memory plan: {gb(plan.trainer_total)} per trainer rank, {gb(plan.engine_total)} per rollout engine, "
        f"{gb(plan.host_total)} of host memory per node (`tidal plan` shows the parts)"
    )


def check_fits(plan: Plan, cfg: RunConfig, host_bytes: int | None = None, gpu_bytes: int | None = None) -> None:
    """Refuse, in one line naming the levers, a run whose plan exceeds the memory it can see. A run
    on CPUs (no trainer GPU) in a runtime of its own lives in this node's host memory (`host_bytes`,
    default what the OS reports); a GPU run's trainer rank must fit a GPU (`gpu_bytes`, default the
    GPU this process sees, if any: a head node without one checks nothing, the workers' nodes'
    host memory is theirs to know)."""
    local_cpu = cfg.trainer.num_gpus == 0 and not cfg.ray.address
    host_bytes = host_bytes if host_bytes is not None else (_host_memory() if local_cpu else None)
    if host_bytes and plan.host_total > host_bytes:
        raise ConfigError(
            f"the memory plan needs {gb(plan.host_total)} of host memory per node and this one has "
            f"{gb(host_bytes)}; levers: {LEVERS} (`tidal plan` shows the parts)"
        )
    if cfg.trainer.num_gpus > 0:
        gpu_bytes = gpu_bytes if gpu_bytes is not None else _gpu_memory()
        if gpu_bytes and plan.trainer_total > gpu_bytes:
            raise ConfigError(
                f"the memory plan needs {gb(plan.trainer_total)} per trainer rank and its GPUs have "
                f"{gb(gpu_bytes)}; levers: {LEVERS} (`tidal plan` shows the parts)"
            )


def no_gpu() -> bool:
    """Whether this process sees no GPU (a GPU run's trainer is then not checked here)."""
    return _gpu_memory() is None


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _gpu_memory() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory
