"""LoRA on the policy (`model.lora`, issue 32), through peft: adapters on the attention projections
and on the MoE experts' fused 3-D weights (peft's `target_parameters`: each expert its own rank-r
pair), the base frozen.

The trainer wraps the policy with `apply_lora` before DeepSpeed takes it (under ZeRO-3 the base is
already partitioned; peft reads the full shapes from `ds_shape`). Only the adapters get gradients
and optimizer states. What leaves the trainer (a publish, a saved checkpoint) is the model the
rollout engines and Hugging Face know: each adapted weight merged, W + (alpha / r) * B @ A, under its
own name (`base_name`), computed out of place so the frozen base stays bit for bit what it was.

Covered: Qwen3-MoE and GLM-4.5 (q, k, v, o and the experts) and GLM-5 (its latent-attention
projections q_a, q_b, kv_a, kv_b, o and the experts); the router and the shared experts are not
adapted by default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tidal.config import EXPERT_PARAMETERS, ConfigError, LoRAConfig

_WRAPPER = re.compile(r"\.base_layer(?=\.)")


def matches(name: str, target: str) -> bool:
    """Whether module or parameter `name` is `target` by peft's rule: the name itself, or ending with
    "." and the target."""
    return name == target or name.endswith("." + target)


def targets(cfg: LoRAConfig, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of `cfg` that a model with these weights (name: shape)
    has; one with none at all, or without the experts `cfg.experts` asks for, is an error naming
    what the model has."""
    linear = [n.removesuffix(".weight") for n, shape in shapes.items() if n.endswith(".weight") and len(shape) == 2]
    modules = [t for t in cfg.target_modules if any(matches(n, t) for n in linear)]
    experts = [t for t in EXPERT_PARAMETERS if cfg.experts and any(n.endswith("." + t) for n in shapes)]
    if cfg.experts and not experts:
        raise ConfigError(
            f"model.lora.experts: the policy has no fused expert weights ({', '.join(EXPERT_PARAMETERS)}); "
            "set model.lora.experts: false"
        )
    if not modules and not experts:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(f"model.lora.target_modules {cfg.target_modules} match no layer; the policy has {names}")
    return modules, experts


def peft_config(cfg: LoRAConfig, modules: list[str], experts: list[str]) -> Any:
    """peft's LoraConfig for `cfg` over these targets."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=modules or None,
        target_parameters=experts or None,
    )


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """`model` with peft LoRA adapters per `cfg` (see `targets`)."""
    from peft import get_peft_model

    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    return get_peft_model(model, peft_config(cfg, *targets(cfg, shapes)))


def adapter_names(config: Any, cfg: LoRAConfig) -> set[str]:
    """The adapter parameters' names a model of this HF config gets (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        return {n for n, _ in apply_lora(model, cfg).named_parameters() if is_adapter(n)}


def peft_state_dict(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapters under the names peft saves them (`adapter_model.safetensors`): without the adapter's
    name (`default`), as vLLM and `PeftModel.from_pretrained` read them."""
    return {n.replace(".default.", "."): t for n, t in adapters.items()}


def is_lora(model: nn.Module) -> bool:
    return type(model).__name__.startswith("Peft")


def is_adapter(name: str) -> bool:
    """A parameter of an adapter (peft's `lora_A` / `lora_B`)."""
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The Hugging Face name of a wrapped model's parameter or buffer: peft's prefix and its
    `base_layer` wrappers dropped."""
    return _WRAPPER.sub("", name.removeprefix("base_model.model."))


def adapted(model: nn.Module) -> dict[str, Any]:
    """The LoRA layer that adapts each weight, by the weight's name in the wrapped model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            param = getattr(module, "parameter_name", None) or "weight"  # a ParamWrapper names its parameter
            inner = module.get_base_layer()
            out[next(n for n, p in model.named_parameters() if p is getattr(inner, param))] = module
    return out


def delta(layer: Any) -> torch.Tensor:
    """The adapter's update to its weight, (alpha / r) * B @ A in the weight's shape, fp32; collective
    under ZeRO-3 (the adapter's parameters are gathered on every rank)."""
    import deepspeed

    params = [*layer.lora_A.parameters(), *layer.lora_B.parameters()]
    with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        return layer.get_delta_weight("default").detach().to(torch.float32)


def save_adapter(out: Path, adapters: dict[str, torch.Tensor], cfg: LoRAConfig, base: str) -> None:
    """The adapters as peft saves them (`adapter_model.safetensors`, `adapter_config.json` naming
    `base`), so `PeftModel.from_pretrained(base_model, out)` loads them."""
    modules = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters if ".experts." not in n})
    experts = [t for t in EXPERT_PARAMETERS if any(".experts." in n for n in adapters)]
    config = peft_config(cfg, modules, experts)
    config.base_model_name_or_path = base
    write_adapter(out, adapters, config)


def write_adapter(out: Path, adapters: dict[str, torch.Tensor], config: Any) -> None:
    """`adapter_model.safetensors` (peft's names) and `adapter_config.json` (peft's `config`) in `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in peft_state_dict(adapters).items()}, str(out / "adapter_model.safetensors"))
    config.save_pretrained(str(out))
