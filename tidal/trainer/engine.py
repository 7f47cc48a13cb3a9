"""The DeepSpeed training engine: one optimizer step per call on a global batch, HF export.

`DeepSpeedTrainer.train_step(batch, loss_fn)` splits this rank's share of the global batch into
micro-batches, runs forward/backward on each and takes exactly one optimizer step. `loss_fn(model,
micro) -> (loss_sum, metrics)` returns a sum over the micro-batch's target tokens; the trainer
divides by the number of target tokens of the whole global batch (all ranks), so the update is the
one plain torch would take on the whole batch with a token-mean loss, independent of the
micro-batch split and the world size. The policy version is the number of optimizer steps taken.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidal.config import ScheduleConfig, TrainerConfig
from tidal.trainer.losses_sft import num_targets, sft_loss

log = logging.getLogger(__name__)

B = TypeVar("B")
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""`loss_fn(model, micro_batch) -> (loss_sum, metrics)`: the loss summed over the micro-batch's
target tokens (a scalar with grad), and further token sums reported as means over the batch."""


# ------------------------------------------------------------------------------------ distributed


def _free_port() -> int:
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
    if dist.is_initialized() or "RANK" in os.environ:
        # A no-op when initialised already (DeepSpeed then wraps the existing process group).
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    else:
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
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


def split_micro_batches(batch: B, size: int) -> list[B]:
    """Split a dataclass of tensors (batch dimension first) into micro-batches of `size` rows."""
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}  # type: ignore[arg-type]
    n = next(v.shape[0] for v in fields.values() if isinstance(v, torch.Tensor))
    return [
        dataclasses.replace(  # type: ignore[type-var]
            batch, **{k: v[i : i + size] for k, v in fields.items() if isinstance(v, torch.Tensor)}
        )
        for i in range(0, n, size)
    ]


def _to_device(batch: B, device: torch.device) -> B:
    tensors = {
        f.name: getattr(batch, f.name).to(device)
        for f in dataclasses.fields(batch)  # type: ignore[arg-type]
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **tensors)  # type: ignore[type-var]


def deepspeed_config(cfg: TrainerConfig) -> dict[str, Any]:
    """The DeepSpeed config dict of a trainer config.

    Gradient accumulation is caller-owned (`managed_gradient_accumulation: false`): every
    `engine.step()` is a boundary, so a batch may hold any number of micro-batches. Clipping at
    ZeRO 0 in fp32 is done by the trainer (DeepSpeed's own does not report the norm).
    """
    own_clip = cfg.zero_stage == 0 and cfg.precision == "fp32"
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0 if own_clip or cfg.max_grad_norm is None else cfg.max_grad_norm,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # Unmanaged accumulation supports overlap_comm at stage 2 only; on CPU it buys nothing.
            "overlap_comm": False,
        },
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------------------------------- trainer


class DeepSpeedTrainer:
    """A DeepSpeed engine around a HF causal LM with torch AdamW and a LambdaLR schedule.

    Collective: every rank constructs it and calls `train_step` / `save_hf` in lockstep.
    """

    def __init__(self, model: PreTrainedModel, cfg: TrainerConfig, total_steps: int | None = None) -> None:
        init_distributed(cfg.backend)
        self.cfg = cfg
        self.total_steps = cfg.schedule.total_steps or total_steps
        lr_factor(0, cfg.schedule, self.total_steps)  # fail fast on a decay without a length
        # A client torch optimizer avoids compiling DeepSpeed's FusedAdam / CPUAdam; the ZeRO
        # optimizers wrap it and step it on their fp32 (partitioned) master weights.
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, cfg.schedule, self.total_steps)
            ),
            config=deepspeed_config(cfg),
        )
        self._grad_norm: float | None = None
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

    def train_step(self, batch: B, loss_fn: LossFn = sft_loss, normalizer: float | None = None) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch; returns global metrics.

        `batch` is a dataclass of tensors with the batch dimension first and a (B, T) `loss_mask`;
        it is split into micro-batches of `micro_batch_size` rows. Every rank must hold the same
        number of micro-batches (their sizes and token counts may differ). `normalizer` replaces
        the global number of target tokens as the divisor of the summed loss (e.g. a constant,
        as in Dr. GRPO); the reported `loss` uses the same divisor. Other metrics are token sums
        reported per target token, except keys ending in `_max`, which are maxima over the batch.
        """
        t0 = time.perf_counter()
        micros = split_micro_batches(batch, self.cfg.micro_batch_size)
        tokens, n_micro = self._global_counts(batch, len(micros))
        # DeepSpeed averages gradients over data-parallel ranks; scaling by the dp size turns that
        # mean back into the sum over ranks, so the gradient is d(sum of losses)/d(theta) / norm.
        denominator = max(normalizer if normalizer is not None else tokens, 1.0)  # all-masked: loss 0, not NaN
        scale = self.engine.dp_world_size / denominator
        lr = self.lr
        sums: dict[str, torch.Tensor] = {}
        maxima: dict[str, torch.Tensor] = {}
        for micro in micros:
            loss_sum, metrics = loss_fn(self.engine, _to_device(micro, self.engine.device))
            # scale_wrt_gas=False: the division by the global count already accounts for accumulation.
            self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            for k, v in {"loss": loss_sum, **metrics}.items():
                v = v.detach().float()
                if k.endswith("_max"):
                    maxima[k] = torch.maximum(maxima[k], v) if k in maxima else v
                else:
                    sums[k] = sums.get(k, 0.0) + v
        self.engine.step()
        out = {k: v / max(tokens, 1.0) for k, v in self._all_reduce(sums, dist.ReduceOp.SUM).items()}
        out.update(self._all_reduce(maxima, dist.ReduceOp.MAX))
        out["loss"] = out["loss"] * max(tokens, 1.0) / denominator
        grad_norm = self._grad_norm if self._grad_norm is not None else self.engine.get_global_grad_norm()
        out.update(
            grad_norm=float("nan") if grad_norm is None else float(grad_norm),
            lr=lr,
            tokens=tokens,
            micro_batches=float(n_micro),
            step_time_s=time.perf_counter() - t0,
        )
        return out

    def _all_reduce(self, values: dict[str, torch.Tensor], op: dist.ReduceOp) -> dict[str, float]:
        if not values:
            return {}
        keys = sorted(values)
        stacked = torch.stack([values[k] for k in keys]).to(self.engine.device)
        dist.all_reduce(stacked, op=op)
        return dict(zip(keys, stacked.tolist(), strict=True))

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

    def iter_full_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor) of every parameter, one at a time (collective under ZeRO).

        Under bf16 or ZeRO these are the optimizer's fp32 master weights, gathered from their
        partitions; tied parameters appear under each of their names.
        """
        cache: dict[int, torch.Tensor] = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if id(p) not in cache:
                full = safe_get_full_fp32_param(p)
                if full is None:  # no master copy: ZeRO 0 in fp32, or a frozen parameter
                    with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                        full = p.detach().float().clone()
                cache[id(p)] = full.cpu()
            yield name, cache[id(p)]

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """Full fp32 state dict (parameters and persistent buffers) on rank 0, `{}` elsewhere."""
        state = dict(self.iter_full_params())
        if self.rank != 0:
            return {}
        persistent = set(self.module.state_dict().keys())
        for name, buf in self.module.named_buffers():
            if name in persistent:
                state[name] = buf.detach().float().cpu()
        return {k: v for k, v in state.items() if k in persistent}

    def save_hf(self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
        """Save a Hugging Face checkpoint in fp32 (model + tokenizer) from rank 0; collective."""
        out = Path(out_dir)
        state = self.state_dict_for_export()
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            config = self.module.config
            dtype = getattr(config, "dtype", None)
            config.dtype = torch.float32  # the weights written are the fp32 masters
            self.module.save_pretrained(out, state_dict=state)
            config.dtype = dtype
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
        dist.barrier()
        return out
