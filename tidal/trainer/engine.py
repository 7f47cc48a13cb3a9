"""The DeepSpeed training engine: one optimizer step per call on a global batch, HF export.

`DeepSpeedTrainer.train_step(batch, loss_fn)` splits this rank's share of the global batch into
micro-batches, runs forward/backward on each and takes exactly one optimizer step. `loss_fn(model,
micro) -> (loss_sum, metrics)` returns a sum over the micro-batch's target tokens; the trainer
divides by the number of target tokens of the whole global batch (all ranks), so the update is the
one plain torch would take on the whole batch with a token-mean loss, independent of the
micro-batch split and the world size. The policy version is the number of optimizer steps taken.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, set_z3_leaf_modules
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidal.config import TrainerConfig
from tidal.model.batching import Micro, filler_micro, plan_micro_batches, shard_rows, to_device
from tidal.model.lora import adapted, base_name, delta, is_adapter, is_lora
from tidal.telemetry.metrics import Metrics, Stat, mean, merge, total
from tidal.trainer.losses_sft import num_targets, sft_loss
from tidal.trainer.prepare import (
    deepspeed_config,
    enable_activation_checkpointing,
    init_distributed,
    lr_factor,
    moe_block_classes,
)

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 2**30
"""Largest safetensors shard of a saved checkpoint (transformers' usual size is 5 GB; smaller shards
keep the host memory a save needs small)."""

B = TypeVar("B")
T = TypeVar("T")
LossFn = Callable[[torch.nn.Module, Any, bool], tuple[torch.Tensor, Metrics]]
"""`loss_fn(model, micro_batch, packed) -> (loss_sum, metrics)`: the loss summed over the micro-batch's
target tokens (a scalar with grad), and metrics that declare how they merge (`tidal.telemetry.metrics`);
`packed`: the forward runs the micro-batch packed (`forward_hidden(packed=True)`, `trainer.packing`)."""


# ---------------------------------------------------------------------------------------- trainer


class DeepSpeedTrainer:
    """A DeepSpeed engine around a HF causal LM with torch AdamW and a LambdaLR schedule.

    Collective: every rank constructs it and calls `train_step` / `save_hf` in lockstep.
    """

    def __init__(self, model: PreTrainedModel, cfg: TrainerConfig, total_steps: int | None = None) -> None:
        if cfg.lr is None:
            raise ValueError(
                "trainer.lr is unset; `tidal train` and `tidal sft` fill in their defaults "
                "(RunConfig.for_rl / for_sft), other callers must set it"
            )
        init_distributed(cfg.backend)
        self.cfg = cfg
        self.total_steps = cfg.schedule.total_steps or total_steps
        lr_factor(0, cfg.schedule, self.total_steps)  # fail fast on a decay without a length
        # A client torch optimizer avoids compiling DeepSpeed's FusedAdam / CPUAdam; the ZeRO
        # optimizers wrap it and step it on their fp32 (partitioned) master weights.
        trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters alone
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        if cfg.zero_stage == 3 and (blocks := moe_block_classes(model)):
            # ZeRO-3 gathers a module's parameters when it runs. Ranks route tokens to different
            # experts, so with experts as modules of their own (per-expert MLPs in many checkpoints'
            # code) each rank would run, and gather, a different set: the collectives no longer pair
            # up and the step hangs. A leaf block gathers all its parameters at once on entry, so
            # every rank makes the same calls whatever its routing (DeepSpeed's fix for MoE).
            set_z3_leaf_modules(model, blocks)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, cfg.schedule, self.total_steps)
            ),
            config=deepspeed_config(cfg),
        )
        self.adapted = adapted(self.module) if is_lora(self.module) else {}
        """LoRA: the layer adapting each adapted weight, by name (empty for full fine-tuning)."""
        self._grad_norm: float | None = None
        self.micros: list[Micro] = []
        """The last step's micro-batches (`plan`)."""
        if cfg.zero_stage == 0 and cfg.precision == "fp32":
            # Gradients are all-reduced by now; clip exactly as torch does and keep the norm.
            optimizer.register_step_pre_hook(self._clip_hook)

    # -- properties

    @property
    def module(self) -> PreTrainedModel:
        return self.engine.module

    @property
    def version(self) -> int:
        """Policy version: the number of optimizer steps taken."""
        return self.engine.global_steps

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def _clip_hook(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.cfg.max_grad_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self._grad_norm = float(norm)

    # -- training

    def train_step(
        self,
        batch: B,
        loss_fn: LossFn = sft_loss,
        normalizer: float | None = None,
        on_grads: Callable[[dict[str, torch.Tensor]], None] | None = None,
        around: Callable[[Any], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> Metrics:
        """One optimizer step on this rank's share of the global batch; returns global metrics.

        `batch` is a dataclass of tensors with the batch dimension first and a (B, T) `loss_mask`;
        it is split into micro-batches of `micro_batch_size` rows, or with
        `trainer.max_tokens_per_micro_batch` into rows grouped by length (`budget_micro_batches`,
        kept in `self.micros` for results to be put back in row order). Every rank must hold the same
        number of micro-batches (their sizes and token counts may differ; under a token budget the
        ranks with fewer run fillers that add nothing). `normalizer` replaces
        the global number of target tokens as the divisor of the summed loss (e.g. a constant,
        as in Dr. GRPO); the reported `loss` uses the same divisor. The loss function's metrics are
        merged over micro-batches and ranks by their own declared reductions.

        `on_grads`, for tests and debugging, is called on every rank with the gradient the optimizer
        is about to apply, before clipping: {name: full fp32 gradient on the CPU} of every trainable
        parameter, the gradient of the loss summed over all ranks' micro-batches divided by the
        denominator. Gathering it is collective and copies every gradient; unused, it costs nothing.

        `around(micro)`: a context each micro-batch's forward and backward run in (routing replay,
        which the backward's recompute of checkpointed layers must see too).
        """
        t0 = time.perf_counter()
        self.micros = self.plan(batch)
        tokens, n_micro = self._global_counts(batch, len(self.micros))
        # DeepSpeed averages gradients over data-parallel ranks; scaling by the dp size turns that
        # mean back into the sum over ranks, so the gradient is d(sum of losses)/d(theta) / norm.
        denominator = max(normalizer if normalizer is not None else tokens, 1.0)  # all-masked: loss 0, not NaN
        scale = self.engine.dp_world_size / denominator
        lr = self.lr
        rows: list[Metrics] = []
        for m in self.micros:
            micro = to_device(m.batch, self.engine.device)
            with around(micro) if around is not None else contextlib.nullcontext():
                loss_sum, metrics = loss_fn(self.engine, micro, m.packed)
                # scale_wrt_gas=False: the division by the global count already accounts for accumulation.
                self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            rows.append({**metrics, "loss": total(loss_sum.detach().float())})
        if on_grads is None:
            self.engine.step()
        else:
            self._step_reading_grads(on_grads)
        out = self.all_reduce(merge(rows))
        out["loss"] = mean(out["loss"].value / denominator, denominator)
        grad_norm = self._grad_norm if self._grad_norm is not None else self.engine.get_global_grad_norm()
        out.update(
            grad_norm=mean(float("nan") if grad_norm is None else float(grad_norm)),
            lr=mean(lr),
            tokens=total(tokens),
            micro_batches=total(float(n_micro)),
            step_time_s=total(time.perf_counter() - t0),
        )
        return out

    def _step_reading_grads(self, on_grads: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """`engine.step()` with `on_grads(full gradients)` between DeepSpeed's gradient reduction and
        the optimizer step.

        With caller-owned accumulation `engine.step()` first completes the gradients (all-reduce at
        ZeRO 0-1, the last partitions at ZeRO 2-3), then calls `engine.optimizer.step()` once, which
        clips (the ZeRO and bf16 wrappers, or `_clip_hook`) and updates. Wrapping that call for this
        step is the only point in between: hooks on the client torch optimizer run too late, after
        ZeRO 1-2 have moved the gradients into their flat partition and freed the per-parameter ones
        that `safe_get_full_grad` reads.
        """
        optimizer = self.engine.optimizer
        # At ZeRO 0 in fp32 this is the client optimizer, whose step torch's lr scheduler has wrapped
        # on the instance; wraps() keeps that wrapper's mark (else the scheduler warns of an override).
        own = vars(optimizer).get("step")
        step = optimizer.step

        @functools.wraps(step)
        def read_then_step(*args: Any, **kwargs: Any) -> Any:
            on_grads(self._full_grads())
            return step(*args, **kwargs)

        optimizer.step = read_then_step
        try:
            self.engine.step()
        finally:
            if own is None:
                del optimizer.step
            else:
                optimizer.step = own

    def _full_grads(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 gradient on the CPU} of every trainable parameter, zeros where it has none; collective."""
        out = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                grad = safe_get_full_grad(p)  # gathered from the partitions under ZeRO 1-3
                # None only at ZeRO 0, for a parameter no token reached (an idle expert), so p is whole.
                # A copy: at ZeRO 0 this is p.grad itself, which clipping then scales in place.
                out[name] = torch.zeros(p.shape) if grad is None else grad.detach().to("cpu", torch.float32, copy=True)
        return out

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over every rank, on the CPU; collective."""
        if self.world_size == 1:
            return t
        out = t.to(self.engine.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.cpu()

    def all_reduce(self, row: Metrics) -> Metrics:
        """The row over all ranks, one collective per reduction (a mean travels as its weighted sum and weight)."""
        keys = sorted(row)
        parts: dict[str, list[torch.Tensor]] = {"sum": [], "max": [], "min": []}
        for k in keys:
            s = row[k]
            if s.reduce == "mean":
                parts["sum"] += [torch.as_tensor(s.value * s.weight), torch.as_tensor(s.weight)]
            else:
                parts[s.reduce].append(torch.as_tensor(s.value))
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        reduced = {}
        for kind, tensors in parts.items():
            if tensors:
                stacked = torch.stack([t.float().to(self.engine.device) for t in tensors])
                dist.all_reduce(stacked, op=ops[kind])
                reduced[kind] = iter(stacked.tolist())
        out: Metrics = {}
        for k in keys:
            kind = row[k].reduce
            if kind == "mean":
                weighted, weight = next(reduced["sum"]), next(reduced["sum"])
                out[k] = mean(weighted / weight if weight else 0.0, weight)
            else:
                out[k] = Stat(next(reduced[kind]), kind)
        return out

    def plan(self, batch: B) -> list[Micro]:
        """This rank's micro-batches of `batch` (see `train_step`). Collective under a token budget."""
        size, budget, packed = self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch, self.cfg.packing
        plan = plan_micro_batches(batch, size, budget, packed)
        if budget is None:
            return plan
        most = torch.tensor(float(len(plan)), device=self.engine.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return plan + [filler_micro(batch, packed)] * (int(most) - len(plan))

    def _global_counts(self, batch: Any, n_micro: int) -> tuple[float, int]:
        """Global number of target tokens; checks that all ranks run the same number of micro-batches."""
        local = torch.tensor([float(num_targets(batch.loss_mask)), float(n_micro)], device=self.engine.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        counts = {int(g[1]) for g in gathered}
        if len(counts) > 1:
            # Raised on every rank alike: a mismatch would otherwise hang in a gradient collective.
            raise ValueError(
                f"ranks hold different numbers of micro-batches {sorted(counts)}; give every rank the same "
                f"number of rows (a multiple of trainer.micro_batch_size={self.cfg.micro_batch_size})"
            )
        return float(sum(g[0] for g in gathered)), n_micro

    # -- export

    def iter_full_params(
        self, dtype: torch.dtype | None = None, skip: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of every parameter, one at a time, in fp32 or `dtype`, on the CPU on
        rank 0 (the other ranks get it where it was gathered; collective under ZeRO: every rank must
        iterate to the end).

        Under bf16 or ZeRO these are the optimizer's fp32 master weights, gathered from their
        partitions; tied parameters appear under each of their names. Each is cast to `dtype` where
        it was gathered, before the copy to the host: a bf16 publish copies 2 bytes per parameter, not
        4. Only a tied parameter's tensor is kept between two yields, so the caller holds at most what
        it keeps itself. `skip` names parameters left out (on every rank alike).
        """
        names = self.module.named_parameters(remove_duplicate=False)
        seen: dict[int, int] = {}
        for _, p in names:
            seen[id(p)] = seen.get(id(p), 0) + 1
        tied: dict[int, torch.Tensor] = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if skip is not None and skip(name):
                continue
            full = tied.get(id(p))
            if full is None:
                full = safe_get_full_fp32_param(p)
                if full is None:  # no master copy: ZeRO 0 in fp32, or a frozen parameter
                    with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                        full = p.detach().to(torch.float32, copy=True)
                if dtype is not None and dtype != full.dtype:
                    full = full.to(dtype)
                if self.rank == 0:
                    full = full.cpu()
                if seen[id(p)] > 1:
                    tied[id(p)] = full
            yield name, full

    def iter_export(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of every entry of the HF state dict (parameters, then persistent
        buffers), one at a time, cast to `dtype` (default fp32 masters); collective, like
        `iter_full_params`, so every rank must run it to the end."""
        persistent = set(self.module.state_dict().keys())
        if self.adapted:  # LoRA: the merged model under its own names, the adapters folded in
            for name, t in self.iter_full_params(skip=is_adapter):
                if name not in persistent:
                    continue
                layer = self.adapted.get(name)
                if layer is not None:
                    d = delta(layer)  # collective: every rank computes it
                    t = t + d.to(t.device) if self.rank == 0 else t
                yield base_name(name), t if dtype is None else t.to(dtype)
        else:
            for name, t in self.iter_full_params(dtype):
                if name in persistent:
                    yield name, t
        for name, buf in self.module.named_buffers():
            if name in persistent:
                yield base_name(name), buf.detach().to("cpu", dtype or torch.float32, copy=True)

    def iter_adapters(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """LoRA: (name, full tensor) of every adapter parameter, under the wrapped model's names, as
        `iter_full_params` gives them (collective)."""
        yield from self.iter_full_params(dtype, skip=lambda name: not is_adapter(name))

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """Full fp32 state dict (parameters and persistent buffers) on rank 0, `{}` elsewhere."""
        state = dict(self.iter_export())
        return state if self.rank == 0 else {}

    # -- data parallelism

    def shard(self, batch: B) -> B:
        """This rank's rows of a global batch (see `shard_rows`)."""
        return shard_rows(batch, self.rank, self.world_size)

    def gather_rows(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        """The global (rows, ...) tensor on the CPU, from every rank's `shard` of it; collective."""
        if self.world_size == 1:
            return local[:rows]
        local = local.to(self.engine.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts)[:rows].cpu()

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled; for small control data); collective."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def save_hf(
        self,
        out_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: torch.dtype = torch.float32,
        shard_bytes: int = SHARD_BYTES,
    ) -> Path:
        """Save a Hugging Face checkpoint (model in `dtype`, by default the fp32 masters, and the
        tokenizer) from rank 0; collective. The weights go out as safetensors shards of at most
        `shard_bytes` (a tensor larger than that is a shard of its own), written one gathered tensor
        at a time: no rank or host holds more than one shard of the model."""
        out = Path(out_dir)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
                old.unlink(missing_ok=True)  # a shard left by an earlier save would be read as ours
        first: dict[int, str] = {}  # a tied parameter is written under its first name only
        for name, p in self.module.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), name)
        tied = {
            base_name(name) for name, p in self.module.named_parameters(remove_duplicate=False) if first[id(p)] != name
        }
        shards: list[dict[str, torch.Tensor]] = [{}]
        held, weight_map = 0, {}
        for name, t in self.iter_export(dtype):
            if self.rank != 0 or name in tied:
                continue
            size = t.numel() * t.element_size()
            if shards[-1] and held + size > shard_bytes:
                _write_shard(out, shards, weight_map)
                held = 0
            shards[-1][name] = t.contiguous()
            held += size
        if self.rank == 0:
            _write_shard(out, shards, weight_map)
            _name_shards(out, weight_map)
            config = copy.deepcopy(self.module.config)
            config.dtype = dtype  # the dtype of the weights written
            config.save_pretrained(out)
            if getattr(self.module, "_auto_class", None) is not None:  # a model with its own code
                from transformers.dynamic_module_utils import custom_object_save

                custom_object_save(self.module, out, config=config)
            if getattr(self.module, "generation_config", None) is not None:
                self.module.generation_config.save_pretrained(out)
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
        dist.barrier()
        return out


def _write_shard(out: Path, shards: list[dict[str, torch.Tensor]], weight_map: dict[str, tuple[int, int]]) -> None:
    """Write the last of `shards` as part-<i> (named once all are written), then start a new one;
    `weight_map` keeps (shard, bytes) per tensor name."""
    from safetensors.torch import save_file

    i = len(shards) - 1
    save_file(shards[i], str(out / f"part-{i}.safetensors"), metadata={"format": "pt"})
    weight_map.update({k: (i, t.numel() * t.element_size()) for k, t in shards[i].items()})
    shards[i] = {}
    shards.append({})


def _name_shards(out: Path, weight_map: dict[str, tuple[int, int]]) -> None:
    """Give the written parts the names transformers gives: `model.safetensors` alone, else
    `model-00001-of-00003.safetensors` and so on, with their index."""
    n = 1 + max((i for i, _ in weight_map.values()), default=0)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        (out / f"part-{i}.safetensors").rename(out / name)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(size for _, size in weight_map.values())},
            "weight_map": {k: names[i] for k, (i, _) in weight_map.items()},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
