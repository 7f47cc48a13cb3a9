"""MoE routing records: the experts each token was routed to, in every MoE layer.

In transformers, the MoE blocks of Qwen3-MoE, GLM-4.5 and GLM-5 route through a router module
(`mlp.gate`: `Qwen3MoeTopKRouter`, `Glm4MoeTopkRouter`, `GlmMoeDsaTopkRouter`) that returns
(router logits, gate weights, expert indices). `RoutingRecorder` keeps the indices of every
forward through forward hooks on those routers: the rollout engine records them during generation
(`TransformersEngine.generate(record_routing=True)`), to be compared with, and replayed by, the
trainer (rollout routing replay, R3).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch

from tidal.model.batching import Micro
from tidal.model.forward import forward_hidden
from tidal.telemetry.metrics import Metrics, largest, mean
from tidal.types import TrainBatch

_recompute = threading.local()


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Marks a backward's recompute of checkpointed layers (`trainer.activation_checkpointing`): a
    `RoutingRecorder` does not record the routers' second call on the same tokens."""
    _recompute.on = True
    try:
        yield
    finally:
        _recompute.on = False


def checkpoint_contexts() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
    """`context_fn` of `torch.utils.checkpoint`: nothing around the forward, `recomputing` around
    the recompute."""
    return contextlib.nullcontext(), recomputing()


ROUTER_SUFFIX = "topkrouter"
"""How the routers' class names end (lower-cased), in every MoE architecture tidal supports."""


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's MoE routers in layer order (dense layers, like GLM's first, have none)."""
    return [m for m in model.modules() if type(m).__name__.lower().endswith(ROUTER_SUFFIX)]


def routing_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type that holds an expert index."""
    return torch.uint8 if num_experts <= 256 else torch.int16


class RoutingRecorder:
    """While entered, keeps the expert indices every MoE router picks in forwards of the entering
    thread (another thread's forward of the same model, such as an evaluation, is not recorded);
    `take()` returns those of the forwards since the last take as one (tokens, MoE layers, top-k)
    tensor, tokens in the order the forwards saw them (row-major over each forward's (batch, length))."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = moe_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE router to record (no module named *TopkRouter)")
        # The routers' own count: under ZeRO-3 a router's weight is a partition, not (experts, hidden).
        self.num_experts = max(int(r.num_experts) for r in self.routers)
        self.dtype = routing_dtype(self.num_experts)
        self._picked: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._hooks: list[Any] = []
        self._thread = 0

    def __enter__(self) -> RoutingRecorder:
        self._thread = threading.get_ident()
        self._hooks = [r.register_forward_hook(partial(self._keep, i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _keep(self, layer: int, module: torch.nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> None:
        if threading.get_ident() != self._thread or getattr(_recompute, "on", False):
            return
        # Kept on the device until `take`: a copy to the host per layer would wait for the GPU each time.
        self._picked[layer].append(output[2].detach().to(self.dtype))

    def take(self) -> torch.Tensor:
        layers = [torch.cat(picked) for picked in self._picked]
        self._picked = [[] for _ in self.routers]
        return torch.stack(layers, dim=1).cpu()


def recorded_positions(batch: TrainBatch) -> torch.Tensor:
    """(B, T) bool: the tokens generation fed to the model, so whose routing it recorded: every real
    token but each row's last; none in a row without trained tokens (a rank's filler rows)."""
    real = batch.attention_mask.bool()
    last = real.long().cumsum(-1) == real.long().sum(-1, keepdim=True)
    return real & ~last & (batch.loss_mask.sum(-1, keepdim=True) > 0)


@torch.no_grad()
def routing_health(model: torch.nn.Module, batch: TrainBatch, plan: Sequence[Micro]) -> Metrics:
    """How `model` routes the batch's tokens against how generation routed them (`batch.routing`):
    per MoE layer and overall, the share of (token, layer) whose top-k expert set is the same
    (`moe/routing_agreement*`), the share of tokens routed differently in any layer
    (`moe/routing_any_flip`), and the most overloaded expert in rollout and in training (load over
    the balanced load, minus 1, the largest over layers: `moe/*_load_violation`).

    The forwards run over `plan`, the batch's micro-batches as the trainer cuts them
    (`DeepSpeedTrainer.plan`: under a token budget, rows grouped by length; fillers, which every
    rank runs alike for ZeRO-3's gathers, forward and count nothing)."""
    assert batch.routing is not None
    device = next(model.parameters()).device
    layers, top_k = batch.routing.shape[2:]
    agree, flips, tokens = torch.zeros(layers), 0, 0
    loads: dict[str, torch.Tensor] = {}
    with RoutingRecorder(model) as recorder:
        num_experts = recorder.num_experts
        loads = {"rollout": torch.zeros(layers, num_experts), "train": torch.zeros(layers, num_experts)}
        for m in plan:
            micro = m.batch
            forward_hidden(model, micro.input_ids.to(device), micro.attention_mask.to(device))
            if not len(m.rows):  # a filler
                recorder.take()
                continue
            mine = recorder.take().view(*micro.input_ids.shape, layers, top_k)[recorded_positions(micro)]
            theirs = micro.routing[recorded_positions(micro)]  # (tokens, layers, top-k)
            same = (mine.long().sort(-1).values == theirs.long().sort(-1).values).all(-1)  # (tokens, layers)
            agree += same.sum(0)
            flips += int((~same).any(-1).sum())
            tokens += same.shape[0]
            for name, picked in (("rollout", theirs), ("train", mine)):
                loads[name] += expert_load(picked, num_experts)
    n = float(max(tokens, 1))
    out: Metrics = {
        "moe/routing_agreement": mean(float(agree.sum()) / (n * layers), n * layers),
        "moe/routing_any_flip": mean(flips / n, n),
        "moe/routing_bytes_per_token": mean(float(layers * top_k * batch.routing.element_size()), n),
    }
    out.update({f"moe/routing_agreement_layer{i}": mean(float(a) / n, n) for i, a in enumerate(agree)})
    balanced = n * top_k / num_experts
    for name, load in loads.items():
        out[f"moe/{name}_load_violation"] = largest(float(load.max()) / balanced - 1.0)
    return out


def gate_weights(router: torch.nn.Module, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The gate weights of `experts` (N, top-k) from router logits (N, experts), as the router's
    architecture computes them for the experts it picks: softmax probabilities (Qwen3-MoE) or
    sigmoid scores without the load-balancing bias, then scaled (GLM-4.5, GLM-5); renormalised over
    the top-k where the architecture does so."""
    if has_correction_bias(router):  # GLM: the bias only steers the choice
        weights = logits.float().sigmoid().gather(1, experts)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor
    weights = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, experts)
    if router.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


class RoutingReplay:
    """While entered, the next forward of `model` routes token n (row-major over the forward's
    (batch, length)) to the experts `routing[n]` (MoE layers, top-k) in every MoE layer where
    `replay[n]`, and as its routers choose elsewhere. Gate weights are recomputed from the routers'
    current logits over the replayed experts (`gate_weights`), so the routers still get gradients
    and their logits still feed the auxiliary load-balancing loss (rollout routing replay, R3)."""

    def __init__(self, model: torch.nn.Module, routing: torch.Tensor, replay: torch.Tensor) -> None:
        self.routers = moe_routers(model)
        if routing.shape[1] != len(self.routers):
            raise ValueError(f"routing of {routing.shape[1]} MoE layers for a model with {len(self.routers)}")
        self.routing, self.replay = routing, replay

    def __enter__(self) -> RoutingReplay:
        for layer, router in enumerate(self.routers):
            router.forward = partial(self._route, router, layer, router.forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for router in self.routers:
            del router.forward  # the class's own again

    def _route(self, router: torch.nn.Module, layer: int, own: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, weights, picked = own(hidden)
        replay = self.replay.to(picked.device)[:, None]
        experts = torch.where(replay, self.routing[:, layer].to(picked.device, torch.long), picked)
        return logits, gate_weights(router, logits, experts).to(weights.dtype), experts


def replay_recorded(model: torch.nn.Module, micro: TrainBatch) -> AbstractContextManager[Any]:
    """`RoutingReplay` of a micro-batch's recorded routing (`TrainBatch.routing`) on its tokens;
    nothing to replay without one."""
    if micro.routing is None:
        return contextlib.nullcontext()
    return RoutingReplay(model, micro.routing.flatten(0, 1), recorded_positions(micro).flatten())


def has_correction_bias(router: torch.nn.Module) -> bool:
    """Whether `router` chooses experts by sigmoid score plus a per-expert correction bias (GLM-4.5,
    GLM-5: DeepSeek-V3's auxiliary-loss-free load balancing) rather than by softmax (Qwen3-MoE)."""
    return hasattr(router, "e_score_correction_bias")


def biased_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routers that choose experts by score plus a per-expert correction bias."""
    return [r for r in moe_routers(model) if has_correction_bias(r)]


def expert_load(picked: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(layers, experts) how many of the tokens' top-k slots went to each expert, from routing
    (tokens, layers, top-k)."""
    return torch.nn.functional.one_hot(picked.long(), num_experts).sum((0, 2)).float()


@torch.no_grad()
def update_router_bias(model: torch.nn.Module, load: torch.Tensor, rate: float) -> Metrics:
    """DeepSeek-V3's bias update from a step's expert load (layers, experts): each router's correction
    bias rises by `rate` for an expert below the mean load and falls by `rate` for one above, so
    the next choices drift toward balance without an auxiliary loss (Megatron's
    `moe_router_bias_update_rate`). The load's violation and the biases' spread are returned."""
    routers = biased_routers(model)
    for router, row in zip(routers, load, strict=True):
        bias = router.e_score_correction_bias
        bias.add_((rate * torch.sign(row.mean() - row)).to(bias.device, bias.dtype))
    biases = torch.stack([r.e_score_correction_bias.float().cpu() for r in routers])
    return {
        "moe/bias_update_load_violation": largest(float((load.max(-1).values / load.mean(-1)).max()) - 1.0),
        "moe/router_bias_abs_max": largest(float(biases.abs().max())),
    }
