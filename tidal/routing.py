"""MoE routing records: the experts each token was routed to, in every MoE layer.

In transformers, the MoE blocks of Qwen3-MoE, GLM-4.5 and GLM-5 route through a router module
(`mlp.gate`: `Qwen3MoeTopKRouter`, `Glm4MoeTopkRouter`, `GlmMoeDsaTopkRouter`) that returns
(router logits, gate weights, expert indices). `RoutingRecorder` keeps the indices of every
forward through forward hooks on those routers: the rollout engine records them during generation
(`TransformersEngine.generate(record_routing=True)`), to be compared with, and replayed by, the
trainer (rollout routing replay, R3).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

ROUTER_SUFFIX = "topkrouter"
"""How the routers' class names end (lower-cased), in every MoE architecture tidal supports."""


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's MoE routers in layer order (dense layers, like GLM's first, have none)."""
    return [m for m in model.modules() if type(m).__name__.lower().endswith(ROUTER_SUFFIX)]


def routing_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type that holds an expert index."""
    return torch.uint8 if num_experts <= 256 else torch.int16


class RoutingRecorder:
    """While entered, keeps the expert indices every MoE router picks; `take()` returns those of
    the forwards since the last take as one (tokens, MoE layers, top-k) tensor, tokens in the
    order the forwards saw them (row-major over each forward's (batch, length))."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = moe_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE router to record (no module named *TopkRouter)")
        self.num_experts = max(int(r.weight.shape[0]) for r in self.routers)
        self.dtype = routing_dtype(self.num_experts)
        self._picked: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._hooks: list[Any] = []

    def __enter__(self) -> RoutingRecorder:
        self._hooks = [r.register_forward_hook(partial(self._keep, i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _keep(self, layer: int, module: torch.nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> None:
        self._picked[layer].append(output[2].detach().to("cpu", self.dtype))

    def take(self) -> torch.Tensor:
        layers = [torch.cat(picked) for picked in self._picked]
        self._picked = [[] for _ in self.routers]
        return torch.stack(layers, dim=1)
